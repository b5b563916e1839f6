/* pingpong: 64-byte request/response over 127.0.0.1, TCP or UDP, the load
 * the hot-path benchmark runs with and without probes attached.
 *
 *   pingpong tcp|udp [-n ROUNDTRIPS] [-t SECONDS] [-c CPU] [-s SIZE]
 *
 * Client and server are two processes (fork) pinned to the same CPU
 * (sched_setaffinity, like taskset -c 1), so each round trip is two context
 * switches on one core and the rate swings little run to run.  TCP: one
 * connection with TCP_NODELAY, send()/recv().  UDP: the client's socket is
 * connected (send()/recv()), the server's is not (recvfrom()/sendto()), so
 * both UDP paths the tracer reads a peer from are exercised.
 *
 * Prints one line:
 *   proto=tcp size=64 cpu=1 round_trips=N seconds=S rate=R ns_per_rt=X cpu_ns_per_rt=Y
 * cpu_ns_per_rt is the CPU time client and server spent per round trip
 * (user + kernel, from /proc/<pid>/schedstat): unlike the wall-clock
 * ns_per_rt it does not grow when another process takes the CPU, so it
 * shows what attached probes add even on a busy machine.
 * Build: cc -O2 -o pingpong pingpong.c */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "pingpong: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) < 0)
		die("sched_setaffinity");
}

/* nanoseconds pid has run on a CPU; -1 where schedstat is missing */
static long long run_ns(pid_t pid)
{
	char path[64];
	long long ns = -1;
	snprintf(path, sizeof(path), "/proc/%d/schedstat", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	if (fscanf(f, "%lld", &ns) != 1)
		ns = -1;
	fclose(f);
	return ns;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* one whole message on a stream socket; 0 at EOF */
static int recv_all(int fd, char *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = recv(fd, buf + got, len - got, 0);
		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("recv");
		}
		got += n;
	}
	return 1;
}

static void send_all(int fd, const char *buf, size_t len)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = send(fd, buf + done, len - done, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("send");
		}
		done += n;
	}
}

static void tcp_server(int lfd, size_t size)
{
	char buf[65536];
	int fd = accept(lfd, NULL, NULL);
	int one = 1;
	if (fd < 0)
		die("accept");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	while (recv_all(fd, buf, size))
		send_all(fd, buf, size);
	close(fd);
}

static void udp_server(int fd, size_t size)
{
	char buf[65536];
	for (;;) {
		struct sockaddr_in peer;
		socklen_t plen = sizeof(peer);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &plen);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("recvfrom");
		}
		if (n == 1 && buf[0] == 'Q')  /* the client's quit message */
			return;
		if (sendto(fd, buf, n, 0, (struct sockaddr *)&peer, plen) < 0)
			die("sendto");
	}
	(void)size;
}

#include <sys/syscall.h>

/* Unrelated work: getpid() (a bare syscall), a 1-byte pipe write + read,
 * or the same over a unix stream socket pair (a socket, not TCP or UDP:
 * the sock tracepoints fire for it), in a loop on one CPU; the same
 * output line, one "round trip" per op. */
static int unrelated(const char *what, double seconds, int cpu)
{
	int p[2], isgetpid = !strcmp(what, "getpid");
	long n = 0;
	char c = 'x';
	pin(cpu);
	if (!strcmp(what, "unix")) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, p) < 0)
			die("socketpair");
	} else if (!isgetpid && pipe(p) < 0)
		die("pipe");
	long long c0 = run_ns(getpid());
	double t0 = now(), t;
	do {
		for (int i = 0; i < 1000; i++) {
			if (isgetpid) {
				syscall(SYS_getpid);
			} else if (write(p[1], &c, 1) != 1 || read(p[0], &c, 1) != 1) {
				die("pipe write/read");
			}
		}
		n += 1000;
		t = now();
	} while (t - t0 < seconds);
	long long c1 = run_ns(getpid());
	printf("proto=%s size=1 cpu=%d round_trips=%ld seconds=%.3f rate=%.0f ns_per_rt=%.1f cpu_ns_per_rt=%.1f\n",
	       what, cpu, n, t - t0, n / (t - t0), (t - t0) * 1e9 / n,
	       c0 >= 0 && c1 >= 0 ? (double)(c1 - c0) / n : -1.0);
	return 0;
}

int main(int argc, char **argv)
{
	long rounds = 0;
	double seconds = 0;
	int cpu = 1, opt, udp;
	size_t size = 64;
	char buf[65536];

	if (argc >= 2 && (!strcmp(argv[1], "getpid") || !strcmp(argv[1], "pipe") ||
			  !strcmp(argv[1], "unix"))) {
		optind = 2;
		seconds = 1;
		while ((opt = getopt(argc, argv, "n:t:c:s:")) != -1) {
			if (opt == 't')
				seconds = atof(optarg);
			else if (opt == 'c')
				cpu = atoi(optarg);
		}
		return unrelated(argv[1], seconds, cpu);
	}
	if (argc < 2 || (strcmp(argv[1], "tcp") && strcmp(argv[1], "udp"))) {
		fprintf(stderr, "usage: pingpong tcp|udp|getpid|pipe|unix [-n ROUNDTRIPS] [-t SECONDS] [-c CPU] [-s SIZE]\n");
		return 2;
	}
	udp = !strcmp(argv[1], "udp");
	optind = 2;
	while ((opt = getopt(argc, argv, "n:t:c:s:")) != -1) {
		switch (opt) {
		case 'n': rounds = atol(optarg); break;
		case 't': seconds = atof(optarg); break;
		case 'c': cpu = atoi(optarg); break;
		case 's': size = (size_t)atol(optarg); break;
		default:
			fprintf(stderr, "usage: pingpong tcp|udp [-n ROUNDTRIPS] [-t SECONDS] [-c CPU] [-s SIZE]\n");
			return 2;
		}
	}
	if (!rounds && !seconds)
		seconds = 1;
	if (size < 1 || size > sizeof(buf))
		size = 64;
	memset(buf, 'x', size);
	pin(cpu);

	struct sockaddr_in addr;
	socklen_t alen = sizeof(addr);
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int sfd = socket(AF_INET, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
	if (sfd < 0)
		die("socket");
	if (bind(sfd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind");
	if (!udp && listen(sfd, 1) < 0)
		die("listen");
	if (getsockname(sfd, (struct sockaddr *)&addr, &alen) < 0)
		die("getsockname");

	pid_t child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {  /* inherits the CPU pinning */
		if (udp)
			udp_server(sfd, size);
		else
			tcp_server(sfd, size);
		_exit(0);
	}
	close(sfd);

	int fd = socket(AF_INET, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
	int one = 1;
	if (fd < 0)
		die("socket");
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("connect");
	if (!udp)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

	/* a short warm-up, then the measured run; the clock is read every
	 * 1024 round trips in a timed run */
	for (int i = 0; i < 1000; i++) {
		send_all(fd, buf, size);
		if (udp ? recv(fd, buf, sizeof(buf), 0) <= 0 : !recv_all(fd, buf, size))
			die("warm-up recv");
	}
	long done = 0;
	long long cpu0 = run_ns(getpid()) + run_ns(child);
	double start = now(), end = start;
	for (;;) {
		send_all(fd, buf, size);
		if (udp) {
			if (recv(fd, buf, sizeof(buf), 0) < 0)
				die("recv");
		} else if (!recv_all(fd, buf, size)) {
			fprintf(stderr, "pingpong: server closed\n");
			return 1;
		}
		done++;
		if (rounds && done >= rounds) {
			end = now();
			break;
		}
		if (!rounds && (done & 1023) == 0 && (end = now()) - start >= seconds)
			break;
	}
	long long cpu1 = run_ns(getpid()) + run_ns(child);
	if (udp)
		send(fd, "Q", 1, 0);
	close(fd);
	waitpid(child, NULL, 0);
	double secs = end - start;
	printf("proto=%s size=%zu cpu=%d round_trips=%ld seconds=%.6f rate=%.1f ns_per_rt=%.1f "
	       "cpu_ns_per_rt=%.1f\n", udp ? "udp" : "tcp", size, cpu, done, secs, done / secs,
	       secs * 1e9 / done, cpu0 < 0 || cpu1 < 0 ? -1.0 : (double)(cpu1 - cpu0) / done);
	return 0;
}
