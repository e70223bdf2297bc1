/*
 * pyshim-pause: the process that holds a pod's namespaces.
 *
 * The daemon spawns it (posix_spawn, never a Python fork) with its orders on
 * the command line and one end of a SOCK_SEQPACKET socketpair as --sync-fd.
 * It creates the namespaces it is told to, sets the hostname, applies
 * namespaced sysctls, and reports back, one message per packet:
 *
 *   "pid N"            the host pid of the process that holds the namespaces
 *   "ready"            set-up done; carries a NETLINK_ROUTE socket opened in
 *                      the new network namespace (SCM_RIGHTS) when --ns has net
 *   "warn TEXT"        something optional failed (e.g. oom_score_adj)
 *   "invalid TEXT"     the orders cannot be carried out (the kernel refused a
 *                      sysctl name or value); the process exits non-zero
 *   "error TEXT"       set-up failed; the process exits non-zero
 *
 * With a new pid namespace the spawned process forks: the child is PID 1 of
 * the pod and becomes the pause; the parent reports the child's pid and exits.
 *
 * After set-up it behaves like the Kubernetes pause: SIGINT/SIGTERM exit 0,
 * SIGCHLD reaps every child, otherwise it sleeps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_SYSCTLS 64

static int sync_fd = -1;

static void send_msg(int fd_to_pass, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0 || sync_fd < 0)
		return;
	if ((size_t)n >= sizeof buf)
		n = sizeof buf - 1;

	struct iovec iov = { .iov_base = buf, .iov_len = (size_t)n };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	union {
		char raw[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	if (fd_to_pass >= 0) {
		memset(&ctl, 0, sizeof ctl);
		msg.msg_control = ctl.raw;
		msg.msg_controllen = sizeof ctl.raw;
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd_to_pass, sizeof(int));
	}
	while (sendmsg(sync_fd, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR)
		;
}

static void fail(const char *what)
{
	send_msg(-1, "error %s: %s", what, strerror(errno));
	_exit(1);
}

static void refuse(const char *why)
{
	send_msg(-1, "error %s", why);
	_exit(2);
}

static void sigdown(int signo)
{
	(void)signo;
	_exit(0);
}

static void sigreap(int signo)
{
	(void)signo;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

static int write_file(const char *path, const char *value)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t len = strlen(value);
	ssize_t n = write(fd, value, len);
	int saved = errno;
	close(fd);
	errno = saved;
	return n == (ssize_t)len ? 0 : -1;
}

/* "net.ipv4.ip_forward=1" -> write "1" to /proc/sys/net/ipv4/ip_forward.
 * The daemon validates names (namespaced only, no '/' or ".."); this only maps them. */
static void apply_sysctl(const char *spec)
{
	const char *eq = strchr(spec, '=');
	if (!eq || eq == spec)
		fail("sysctl: malformed");
	char path[256] = "/proc/sys/";
	size_t off = strlen(path);
	size_t keylen = (size_t)(eq - spec);
	if (off + keylen >= sizeof path)
		fail("sysctl: name too long");
	for (size_t i = 0; i < keylen; i++)
		path[off + i] = spec[i] == '.' ? '/' : spec[i];
	path[off + keylen] = '\0';
	if (write_file(path, eq + 1) < 0) {
		/* The request's fault, not ours: no such setting, or a value it refuses. */
		if (errno == ENOENT)
			send_msg(-1, "invalid sysctl %.*s: the kernel has no such setting", (int)keylen, spec);
		else
			send_msg(-1, "invalid sysctl %s refused by the kernel: %s", spec, strerror(errno));
		_exit(1);
	}
}

static void install_handlers(void)
{
	struct sigaction down = { .sa_handler = sigdown };
	struct sigaction reap = { .sa_handler = sigreap, .sa_flags = SA_NOCLDSTOP | SA_RESTART };
	sigemptyset(&down.sa_mask);
	sigemptyset(&reap.sa_mask);
	if (sigaction(SIGINT, &down, NULL) < 0 || sigaction(SIGTERM, &down, NULL) < 0 ||
	    sigaction(SIGCHLD, &reap, NULL) < 0)
		fail("sigaction");
}

static void usage(void)
{
	send_msg(-1, "error bad arguments (see pyshim-pause --help)");
	fprintf(stderr,
		"usage: pyshim-pause [--id ID] [--ns net,ipc,uts,pid] [--hostname NAME]\n"
		"                    [--sysctl KEY=VALUE]... [--oom-score-adj N] [--sync-fd FD]\n"
		"       pyshim-pause -v\n"
		"Holds a pod's namespaces for pyshim; started by the daemon, not by hand.\n");
	exit(2);
}

int main(int argc, char **argv)
{
	int flags = 0, new_pid = 0, new_net = 0;
	const char *hostname = NULL, *oom = NULL;
	const char *sysctls[MAX_SYSCTLS];
	int nsysctls = 0;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "-v") || !strcmp(a, "--version")) {
			printf("pyshim-pause %s\n", PAUSE_VERSION);
			return 0;
		}
		if (!v)
			usage();
		i++;
		if (!strcmp(a, "--id")) {
			/* Recorded in argv so that ps and the start-up sweep can tell pods apart. */
		} else if (!strcmp(a, "--hostname")) {
			hostname = v;
		} else if (!strcmp(a, "--oom-score-adj")) {
			oom = v;
		} else if (!strcmp(a, "--sync-fd")) {
			sync_fd = atoi(v);
		} else if (!strcmp(a, "--sysctl")) {
			if (nsysctls == MAX_SYSCTLS)
				usage();
			sysctls[nsysctls++] = v;
		} else if (!strcmp(a, "--ns")) {
			char *list = strdup(v);
			if (!list)
				fail("strdup");
			for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
				if (!strcmp(tok, "net"))
					flags |= CLONE_NEWNET, new_net = 1;
				else if (!strcmp(tok, "ipc"))
					flags |= CLONE_NEWIPC;
				else if (!strcmp(tok, "uts"))
					flags |= CLONE_NEWUTS;
				else if (!strcmp(tok, "pid"))
					new_pid = 1;
				else
					usage();
			}
			free(list);
		} else {
			usage();
		}
	}

	/* Only stdio and the sync fd: nothing of the daemon's (or another pod's) may
	 * stay open in a process that lives as long as the pod. */
	if (sync_fd > 3)
		close_range(3, (unsigned)sync_fd - 1, 0);
	close_range(sync_fd >= 3 ? (unsigned)sync_fd + 1 : 3, ~0U, 0);
	if (sync_fd >= 0)
		fcntl(sync_fd, F_SETFD, FD_CLOEXEC);
	/* Orders that would change the host's own namespaces are refused here too. */
	if (hostname && !(flags & CLONE_NEWUTS))
		refuse("--hostname needs a new uts namespace");
	for (int i = 0; i < nsysctls; i++) {
		int is_net = !strncmp(sysctls[i], "net.", 4);
		if (is_net ? !new_net : !(flags & CLONE_NEWIPC))
			refuse("--sysctl needs a new namespace of its kind");
	}
	/* Installed before any fork: as PID 1 of a pid namespace, a process without
	 * handlers ignores SIGTERM. */
	install_handlers();
	if (oom && write_file("/proc/self/oom_score_adj", oom) < 0)
		send_msg(-1, "warn oom_score_adj %s: %s", oom, strerror(errno));
	if (flags && unshare(flags) < 0)
		fail("unshare");
	if (hostname && sethostname(hostname, strlen(hostname)) < 0)
		fail("sethostname");
	for (int i = 0; i < nsysctls; i++)
		apply_sysctl(sysctls[i]);

	if (new_pid) {
		if (unshare(CLONE_NEWPID) < 0)
			fail("unshare pid");
		pid_t child = fork();
		if (child < 0)
			fail("fork");
		if (child > 0) {
			send_msg(-1, "pid %d", (int)child);
			_exit(0);
		}
	} else {
		send_msg(-1, "pid %d", (int)getpid());
	}

	int nl = -1;
	if (new_net) {
		nl = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_ROUTE);
		if (nl < 0)
			fail("netlink socket");
	}
	send_msg(nl, "ready");
	if (nl >= 0)
		close(nl);
	if (sync_fd >= 0)
		close(sync_fd);
	sync_fd = -1;

	/* Nothing of the daemon's may keep this process's cwd or stdio busy. */
	if (chdir("/") < 0)
		return 1;
	for (;;)
		pause();
	return 42;
}
