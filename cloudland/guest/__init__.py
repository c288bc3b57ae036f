"""The Cloudland test guest: a tiny Debian-kernel + busybox disk image that boots in seconds."""

BOOT_MARKER = "cloudland-guest: booted"
POWEROFF_MARKER = "cloudland-guest: powering off"
DHCP_FAILED_MARKER = "cloudland-guest: dhcp failed"
IP_MARKER_PREFIX = "cloudland-guest: ip eth0 "
READY_MARKER = "cloudland-guest: ready"
