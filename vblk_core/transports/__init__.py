"""The ways of reaching a virtio device, each an implementation of ``vblk_core.transport``.

    vhost_user.py  a unix socket to a vhost-user back-end (qemu-storage-daemon, SPDK)
    vhost_vdpa.py  ioctls on /dev/vhost-vdpa-N (a DPU's vDPA device, VDUSE)
    vfio_pci.py    a virtio-blk PCI function bound to vfio-pci (BARs, MSI-X, IOMMU mappings)
    virtio_pci.py  the virtio PCI capabilities and registers (used by vfio_pci only)
    vfio.py        the VFIO uapi: ioctls, regions, IOMMU DMA mappings (used by vfio_pci only)

May import vblk_core's errors, eventfd, transport and virtio modules, never the ring or device
layers.
"""
