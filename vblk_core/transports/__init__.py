"""The ways of reaching a virtio device, each an implementation of ``vblk_core.transport``.

Each module: what it owns | what it may import (of vblk_core; of this package, above it).

    ioctl.py          ioctl numbers, names, calls, errors  | errors
    virtio_status.py  device-status machine, feature check | errors virtio
    vhost_user.py     a vhost-user back-end's socket       | errors eventfd transport; virtio_status
    vhost_vdpa.py     /dev/vhost-vdpa-N: ioctls, IOTLB     | errors eventfd transport virtio;
                                                             ioctl virtio_status
    vfio.py           VFIO uapi, the PCI address rule      | errors; ioctl
    virtio_pci.py     virtio PCI capabilities, registers   | errors; vfio
    vfio_pci.py       a PCI function through vfio-pci      | errors eventfd layout transport
                                                             virtio; vfio virtio_pci virtio_status

None of them imports the ring or device layers (virtqueue, queues, device, ...), which only see
a Transport.  The PCI address rule (vfio.normalize_pci_address) is the plugin's pci= rule too.

Adding a transport:
1. A module here with a Connector (``target``, ``connect()``) and a Transport subclass that
   implements transport.py's abstract methods (negotiate, read_config, max_queues,
   map_memory, setup_queue, start, loss_fd, loss_reason, close; max_queue_size if the device
   limits rings), its errors TransportError / ConnectError naming the device by the
   ``target`` one ``describe`` builds.
2. A device with a status register supplies virtio_status.StatusRegisters (status,
   device_features, set_driver_features) and lets VirtioStatus reset, acknowledge,
   negotiate, start and judge loss; one without (vhost-user) still calls require_features.
3. A device file: ioctl numbers from ioctl.ioc, listed with name_ioctls, made with
   ioctl.call (the error names the ioctl and the fix); its system calls an OsFileOps
   subclass, taken as ``ops`` so that tests put a fake device behind them.
4. Tests: a fake device in tests/fake_NAME.py, written from the spec (not importing the
   driver), serving the rings through the shared virtio-blk emulator of tests/; tests in
   tests/test_NAME.py (each set-up error, the status handshake, loss, a BlockDevice moving
   data byte for byte on the fake); and a test against the real device (tests/vm/ when it
   needs a guest kernel).
5. Export its Connector from vblk_core/__init__.py, give it a device key in
   plugin/vblk_plugin/config.py (DEVICE_KEYS, KEYS, connector()), document it in README.md.
"""
