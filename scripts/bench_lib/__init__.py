"""Support code for scripts/bench (the vblk benchmark harness) and scripts/profile_plugin."""
