"""The nbdkit plugin's own code, beside plugin/plugin.py (which holds only nbdkit callbacks).

    config.py  PluginConfig / KEYS: the key=value parser and the start-up checks
    daemon.py  ManagedDaemon: the private qemu-storage-daemon of image= mode
    qsd.py     qsd_argv: the one qemu-storage-daemon command line (also used by the tests,
               scripts/soak and the benchmarks), the install hint, the readiness probe
    stats.py   StatsWriter: the stats= JSON file

May import vblk_core (the driver) and the standard library; never nbdkit, so everything here
runs and is tested without a server.
"""
