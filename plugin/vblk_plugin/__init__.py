"""vblk's nbdkit plugin and the ``vblk`` command.

    nbdkit_plugin.py  the nbdkit callbacks: the plugin file itself (``vblk plugin-path`` prints
                      its path; plugin/plugin.py loads it in a checkout); the only module
                      here that imports nbdkit
    config.py   PluginConfig / KEYS: the key=value parser and the start-up checks
    daemon.py   ManagedDaemon: the private qemu-storage-daemon of image= mode
    qsd.py      qsd_argv: the one qemu-storage-daemon command line (also used by the tests,
                scripts/soak and the benchmarks), the install hint, the readiness probe
    stats.py    StatsWriter: the stats= JSON file
    cli.py      ``vblk`` (and ``python3 -m vblk_plugin``): info, stats, plugin-path, --version
    examine.py  ``vblk info``'s short session with a device; report.py its output and the
                export's description; users.py who holds a busy device
    statsview.py  ``vblk stats``: the stats= file as a live view

May import vblk_core (the driver) and the standard library; only nbdkit_plugin.py imports
nbdkit, so everything else runs and is tested without a server.
"""
