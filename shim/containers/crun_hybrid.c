/*
 * pyshim-crun-hybrid: runs an OCI runtime's `create` with /sys/fs/cgroup/unified
 * hidden, in a mount namespace of its own.
 *
 * crun refuses a hybrid cgroup layout (v1 hierarchies plus a cgroup2 mount at
 * /sys/fs/cgroup/unified): "cgroups in hybrid mode not supported". Without that
 * mount in its view it sees a plain v1 host. The namespace keeps the node's
 * propagation, so that rslave/rshared container mounts still see the node's
 * events; /sys/fs/cgroup alone is made private first, or the unmount would
 * propagate and take the node's cgroup2 mount away.
 *
 * conmon runs it as the runtime (`-r`), so its arguments are the runtime's; the
 * runtime itself is named by the environment variable PYSHIM_RUNTIME. A native
 * program because the shell and unshare(1) cost ~6 ms per container here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define UNIFIED "/sys/fs/cgroup/unified"

static int is_mount_point(const char *path)
{
	struct stat here, parent;
	char up[sizeof UNIFIED + 3];
	snprintf(up, sizeof up, "%s/..", path);
	if (stat(path, &here) < 0 || stat(up, &parent) < 0)
		return 0;
	return here.st_dev != parent.st_dev;
}

int main(int argc, char **argv)
{
	const char *runtime = getenv("PYSHIM_RUNTIME");
	if (!runtime || runtime[0] != '/') {
		fprintf(stderr, "pyshim-crun-hybrid: PYSHIM_RUNTIME must name the runtime by its path\n");
		return 125;
	}
	(void)argc;
	if (is_mount_point(UNIFIED)) {
		if (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/sys/fs/cgroup", NULL, MS_PRIVATE, NULL) < 0 ||
		    umount2(UNIFIED, MNT_DETACH) < 0) {
			fprintf(stderr, "pyshim-crun-hybrid: hiding %s: %s\n", UNIFIED, strerror(errno));
			return 125;
		}
	}
	argv[0] = (char *)runtime;
	execv(runtime, argv);
	fprintf(stderr, "pyshim-crun-hybrid: %s: %s\n", runtime, strerror(errno));
	return 127;
}
