/*
 * vsock-test: the tier-A guest's AF_VSOCK (SOCK_STREAM) test program, built
 * by build-tier-a.sh with `gcc -static -O2` into the initramfs as
 * /bin/vsock-test. The host side of the tests (tests/vsock_tier_a.rs,
 * bench/vsock.py) parses what it prints; keep them in step.
 *
 * Usage (ENDPOINT is either `l:PORT` = listen on PORT for any CID and accept,
 * or `CID:PORT` = connect to CID, e.g. 2:6000 for the host):
 *
 *   vsock-test echo PORT
 *       Listens on PORT and serves any number of connections concurrently (one
 *       thread each): every byte read is written back, until EOF or an error,
 *       then the connection is closed. Never exits by itself.
 *       Per connection: VT-ECHO conn=ID bytes=N ms=T end=eof|ERRNAME
 *
 *   vsock-test sink ENDPOINT [COUNT]
 *       COUNT connections (default 1; with l:PORT, 0 = serve forever), handled
 *       concurrently: each reads until EOF, then closes.
 *       Per connection: VT-SINK conn=ID bytes=N fnv=HEX ms=T end=eof|ERRNAME
 *
 *   vsock-test source ENDPOINT BYTES [COUNT]
 *       COUNT connections as for sink: each writes BYTES bytes of the pattern
 *       (seed 0), then shuts its write side down, reads (and discards) until
 *       the peer closes, then closes.
 *       Per connection: VT-SOURCE conn=ID bytes=N fnv=HEX ms=T end=eof|ERRNAME
 *
 *   vsock-test flood ENDPOINT [PROGRESS_MIB]
 *       One connection: writes the pattern (seed 0) until a write fails (the
 *       peer closed or reset it). Every PROGRESS_MIB MiB (default 0 = never)
 *       it prints VT-FLOOD-PROGRESS bytes=N; at the end
 *       VT-FLOOD bytes=N fnv=HEX ms=T end=ERRNAME
 *       (N = bytes the kernel accepted, fnv over exactly those bytes).
 *
 *   vsock-test connect CID PORT BYTES [COUNT]
 *       Opens COUNT (default 1) connections to CID:PORT one after another, then
 *       on all of them at once: a writer thread sends BYTES bytes of the
 *       pattern with seed = connection index (0..COUNT-1) and then shuts the
 *       write side down, while the connection's reader reads until EOF. Meant
 *       against an echo server: a connection is ok if it read back exactly
 *       what it sent and ended with EOF.
 *       Per connection: VT-CONN conn=I sent=N sent_fnv=HEX recv=M recv_fnv=HEX
 *                       ms=T end=eof|ERRNAME ok=0|1
 *       At the end:     VT-CONNECT-DONE count=C ok=K connect_failed=F
 *                       sent=TOTAL recv=TOTAL ms=T
 *       (ms from the first connect() to the last connection's end)
 *
 *   vsock-test refused CID PORT
 *       One connect() to CID:PORT (expected to be refused). Prints
 *       VT-REFUSED ret=0|-1 err=ERRNAME|none ms=T
 *
 * Every listening mode prints VT-LISTEN mode=MODE port=PORT once listen()
 * succeeded; every connection is announced as VT-ACCEPTED mode=MODE conn=ID
 * or VT-CONNECTED mode=MODE conn=ID. A failing setup step prints
 * VT-ERROR what=STEP err=ERRNAME and exits 1; bad usage exits 2.
 * conn IDs count from 0 per process in accept/connect order. Each line is
 * written with one write(2), so lines of concurrent connections never mix.
 *
 * The pattern: byte i (from 0) of a stream with seed S is
 *     (uint8_t)((i * 0x9E3779B97F4A7C15 + S * 0xD1B54A32D192ED03) >> 56)
 * (64-bit wrapping arithmetic). Checksums are 64-bit FNV-1a (offset basis
 * 0xcbf29ce484222325, prime 0x100000001b3), printed as 16 lower-case hex
 * digits. Times are milliseconds of CLOCK_MONOTONIC.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF_SIZE (64 * 1024)
#define FNV_BASIS 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

static const char *mode;

static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	const char *p = line;
	while (n > 0) {
		ssize_t w = write(STDOUT_FILENO, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= w;
	}
}

static const char *errname(int e)
{
	const char *s = strerrorname_np(e);
	return s ? s : "EUNKNOWN";
}

static void fail(const char *what, int e)
{
	say("VT-ERROR what=%s err=%s", what, errname(e));
	exit(1);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: vsock-test echo PORT | sink ENDPOINT [COUNT] |\n"
		"       source ENDPOINT BYTES [COUNT] | flood ENDPOINT [PROGRESS_MIB] |\n"
		"       connect CID PORT BYTES [COUNT] | refused CID PORT\n"
		"ENDPOINT: l:PORT (listen) or CID:PORT (connect)\n");
	exit(2);
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t parse_u64(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end)
		usage();
	return v;
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= FNV_PRIME;
	}
	return h;
}

static void pattern(unsigned char *p, size_t n, uint64_t seed, uint64_t off)
{
	uint64_t base = seed * 0xD1B54A32D192ED03ull;
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)(((off + i) * 0x9E3779B97F4A7C15ull + base) >> 56);
}

/* Writes all of p; returns 0 or the errno that stopped it (*done = bytes written). */
static int write_all(int fd, const unsigned char *p, size_t n, size_t *done)
{
	size_t off = 0;
	while (off < n) {
		ssize_t w = write(fd, p + off, n - off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			*done = off;
			return errno;
		}
		off += w;
	}
	*done = off;
	return 0;
}

/* Reads until EOF (returns 0) or an error (returns its errno). */
static int read_to_end(int fd, unsigned char *buf, uint64_t *bytes, uint64_t *h)
{
	for (;;) {
		ssize_t r = read(fd, buf, BUF_SIZE);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		if (r == 0)
			return 0;
		*bytes += r;
		if (h)
			*h = fnv(*h, buf, r);
	}
}

static const char *endname(int e)
{
	return e ? errname(e) : "eof";
}

/* --- endpoints ------------------------------------------------------------ */

struct endpoint {
	int listen;
	unsigned cid;
	unsigned port;
};

static struct endpoint parse_endpoint(const char *s)
{
	struct endpoint ep = {0};
	const char *colon = strchr(s, ':');
	if (!colon)
		usage();
	char head[32];
	size_t hl = colon - s;
	if (hl == 0 || hl >= sizeof(head))
		usage();
	memcpy(head, s, hl);
	head[hl] = 0;
	if (strcmp(head, "l") == 0)
		ep.listen = 1;
	else
		ep.cid = parse_u64(head);
	ep.port = parse_u64(colon + 1);
	return ep;
}

static int vsock_listen(unsigned port)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		fail("socket", errno);
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
		fail("bind", errno);
	if (listen(fd, 128) < 0)
		fail("listen", errno);
	say("VT-LISTEN mode=%s port=%u", mode, port);
	return fd;
}

/* Returns a connected socket, or -1 with errno set. */
static int vsock_connect(unsigned cid, unsigned port)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

static pthread_mutex_t id_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned next_id;

static unsigned new_id(void)
{
	pthread_mutex_lock(&id_lock);
	unsigned id = next_id++;
	pthread_mutex_unlock(&id_lock);
	return id;
}

static void spawn(void *(*fn)(void *), void *arg, pthread_t *out)
{
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	pthread_t t;
	int e = pthread_create(&t, &attr, fn, arg);
	pthread_attr_destroy(&attr);
	if (e)
		fail("pthread_create", e);
	if (out)
		*out = t;
	else
		pthread_detach(t);
}

/* --- per-connection handlers (sink, source, flood, echo) -------------------- */

struct conn {
	int fd;
	unsigned id;
	uint64_t bytes; /* source: bytes to send */
	uint64_t progress_mib;
};

static void *echo_conn(void *arg)
{
	struct conn *c = arg;
	unsigned char *buf = malloc(BUF_SIZE);
	if (!buf)
		fail("malloc", ENOMEM);
	uint64_t t0 = now_ms(), total = 0;
	int err = 0;
	for (;;) {
		ssize_t r = read(c->fd, buf, BUF_SIZE);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			err = errno;
			break;
		}
		if (r == 0)
			break;
		size_t done;
		err = write_all(c->fd, buf, r, &done);
		total += done;
		if (err)
			break;
	}
	say("VT-ECHO conn=%u bytes=%" PRIu64 " ms=%" PRIu64 " end=%s", c->id, total,
	    now_ms() - t0, endname(err));
	close(c->fd);
	free(buf);
	free(c);
	return NULL;
}

static void *sink_conn(void *arg)
{
	struct conn *c = arg;
	unsigned char *buf = malloc(BUF_SIZE);
	if (!buf)
		fail("malloc", ENOMEM);
	uint64_t t0 = now_ms(), total = 0, h = FNV_BASIS;
	int err = read_to_end(c->fd, buf, &total, &h);
	say("VT-SINK conn=%u bytes=%" PRIu64 " fnv=%016" PRIx64 " ms=%" PRIu64 " end=%s", c->id,
	    total, h, now_ms() - t0, endname(err));
	close(c->fd);
	free(buf);
	return NULL;
}

static void *source_conn(void *arg)
{
	struct conn *c = arg;
	unsigned char *buf = malloc(BUF_SIZE);
	if (!buf)
		fail("malloc", ENOMEM);
	uint64_t t0 = now_ms(), off = 0, h = FNV_BASIS;
	int err = 0;
	while (off < c->bytes) {
		size_t n = c->bytes - off < BUF_SIZE ? c->bytes - off : BUF_SIZE;
		pattern(buf, n, 0, off);
		size_t done;
		err = write_all(c->fd, buf, n, &done);
		h = fnv(h, buf, done);
		off += done;
		if (err)
			break;
	}
	if (!err) {
		shutdown(c->fd, SHUT_WR);
		uint64_t ignored = 0;
		err = read_to_end(c->fd, buf, &ignored, NULL);
	}
	say("VT-SOURCE conn=%u bytes=%" PRIu64 " fnv=%016" PRIx64 " ms=%" PRIu64 " end=%s", c->id,
	    off, h, now_ms() - t0, endname(err));
	close(c->fd);
	free(buf);
	return NULL;
}

static void *flood_conn(void *arg)
{
	struct conn *c = arg;
	unsigned char *buf = malloc(BUF_SIZE);
	if (!buf)
		fail("malloc", ENOMEM);
	uint64_t t0 = now_ms(), off = 0, h = FNV_BASIS;
	uint64_t step = c->progress_mib << 20, next = step;
	int err;
	for (;;) {
		pattern(buf, BUF_SIZE, 0, off);
		size_t done;
		err = write_all(c->fd, buf, BUF_SIZE, &done);
		h = fnv(h, buf, done);
		off += done;
		if (err)
			break;
		if (step && off >= next) {
			say("VT-FLOOD-PROGRESS bytes=%" PRIu64, off);
			next += step;
		}
	}
	say("VT-FLOOD bytes=%" PRIu64 " fnv=%016" PRIx64 " ms=%" PRIu64 " end=%s", off, h,
	    now_ms() - t0, errname(err));
	close(c->fd);
	free(buf);
	return NULL;
}

/* Runs handler on COUNT connections of ENDPOINT (0 with l:PORT = forever). */
static void serve(struct endpoint ep, uint64_t count, uint64_t bytes, uint64_t progress_mib,
		  void *(*handler)(void *))
{
	if (!ep.listen && count == 0)
		usage();
	pthread_t *threads = calloc(count ? count : 1, sizeof(pthread_t));
	struct conn *conns = calloc(count ? count : 1, sizeof(struct conn));
	if (!threads || !conns)
		fail("malloc", ENOMEM);
	int lfd = ep.listen ? vsock_listen(ep.port) : -1;
	for (uint64_t i = 0; count == 0 || i < count; i++) {
		struct conn *c = count ? &conns[i] : malloc(sizeof(*c));
		if (!c)
			fail("malloc", ENOMEM);
		if (ep.listen) {
			c->fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
			if (c->fd < 0)
				fail("accept", errno);
			c->id = new_id();
			say("VT-ACCEPTED mode=%s conn=%u", mode, c->id);
		} else {
			c->fd = vsock_connect(ep.cid, ep.port);
			if (c->fd < 0)
				fail("connect", errno);
			c->id = new_id();
			say("VT-CONNECTED mode=%s conn=%u", mode, c->id);
		}
		c->bytes = bytes;
		c->progress_mib = progress_mib;
		spawn(handler, c, count ? &threads[i] : NULL);
		/* serve forever: the handler does not free c (tiny, bounded by
		 * the connections this process ever accepts) */
	}
	for (uint64_t i = 0; i < count; i++)
		pthread_join(threads[i], NULL);
}

/* --- connect -------------------------------------------------------------- */

struct cconn {
	int fd;
	unsigned idx;
	uint64_t bytes;
	uint64_t sent, sent_fnv;
	int write_err;
	pthread_t writer;
	pthread_t reader;
	uint64_t recv, recv_fnv;
	int read_err;
	uint64_t t0, t1;
};

static void *cconn_writer(void *arg)
{
	struct cconn *c = arg;
	unsigned char *buf = malloc(BUF_SIZE);
	if (!buf)
		fail("malloc", ENOMEM);
	c->sent_fnv = FNV_BASIS;
	while (c->sent < c->bytes) {
		size_t n = c->bytes - c->sent < BUF_SIZE ? c->bytes - c->sent : BUF_SIZE;
		pattern(buf, n, c->idx, c->sent);
		size_t done;
		c->write_err = write_all(c->fd, buf, n, &done);
		c->sent_fnv = fnv(c->sent_fnv, buf, done);
		c->sent += done;
		if (c->write_err)
			break;
	}
	if (!c->write_err)
		shutdown(c->fd, SHUT_WR);
	free(buf);
	return NULL;
}

static void *cconn_reader(void *arg)
{
	struct cconn *c = arg;
	unsigned char *buf = malloc(BUF_SIZE);
	if (!buf)
		fail("malloc", ENOMEM);
	c->recv_fnv = FNV_BASIS;
	c->read_err = read_to_end(c->fd, buf, &c->recv, &c->recv_fnv);
	pthread_join(c->writer, NULL);
	c->t1 = now_ms();
	int ok = !c->read_err && !c->write_err && c->recv == c->sent && c->sent == c->bytes &&
		 c->recv_fnv == c->sent_fnv;
	say("VT-CONN conn=%u sent=%" PRIu64 " sent_fnv=%016" PRIx64 " recv=%" PRIu64
	    " recv_fnv=%016" PRIx64 " ms=%" PRIu64 " end=%s ok=%d",
	    c->idx, c->sent, c->sent_fnv, c->recv, c->recv_fnv, c->t1 - c->t0,
	    c->read_err ? errname(c->read_err) : c->write_err ? errname(c->write_err) : "eof", ok);
	return NULL;
}

static void run_connect(unsigned cid, unsigned port, uint64_t bytes, uint64_t count)
{
	if (count == 0)
		usage();
	struct cconn *cs = calloc(count, sizeof(*cs));
	if (!cs)
		fail("malloc", ENOMEM);
	uint64_t t0 = now_ms(), failed = 0;
	for (uint64_t i = 0; i < count; i++) {
		cs[i].idx = i;
		cs[i].bytes = bytes;
		cs[i].fd = vsock_connect(cid, port);
		if (cs[i].fd < 0) {
			say("VT-CONN conn=%" PRIu64 " connect=%s ok=0", i, errname(errno));
			failed++;
			continue;
		}
		say("VT-CONNECTED mode=connect conn=%" PRIu64, i);
	}
	for (uint64_t i = 0; i < count; i++) {
		if (cs[i].fd < 0)
			continue;
		cs[i].t0 = now_ms();
		spawn(cconn_writer, &cs[i], &cs[i].writer);
		spawn(cconn_reader, &cs[i], &cs[i].reader);
	}
	uint64_t ok = 0, sent = 0, recv = 0;
	for (uint64_t i = 0; i < count; i++) {
		if (cs[i].fd < 0)
			continue;
		pthread_join(cs[i].reader, NULL);
		close(cs[i].fd);
		sent += cs[i].sent;
		recv += cs[i].recv;
		ok += !cs[i].read_err && !cs[i].write_err && cs[i].recv == cs[i].sent &&
		      cs[i].sent == bytes && cs[i].recv_fnv == cs[i].sent_fnv;
	}
	say("VT-CONNECT-DONE count=%" PRIu64 " ok=%" PRIu64 " connect_failed=%" PRIu64
	    " sent=%" PRIu64 " recv=%" PRIu64 " ms=%" PRIu64,
	    count, ok, failed, sent, recv, now_ms() - t0);
}

/* --- main ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	if (argc < 3)
		usage();
	mode = argv[1];
	/* a peer that goes away must not kill us: writes return EPIPE instead */
	signal(SIGPIPE, SIG_IGN);
	if (strcmp(mode, "echo") == 0 && argc == 3) {
		int lfd = vsock_listen(parse_u64(argv[2]));
		for (;;) {
			int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
			if (fd < 0) {
				if (errno == EINTR || errno == ECONNABORTED)
					continue;
				fail("accept", errno);
			}
			struct conn *c = calloc(1, sizeof(*c));
			if (!c)
				fail("malloc", ENOMEM);
			c->fd = fd;
			c->id = new_id();
			spawn(echo_conn, c, NULL);
		}
	} else if (strcmp(mode, "sink") == 0 && (argc == 3 || argc == 4)) {
		serve(parse_endpoint(argv[2]), argc == 4 ? parse_u64(argv[3]) : 1, 0, 0, sink_conn);
	} else if (strcmp(mode, "source") == 0 && (argc == 4 || argc == 5)) {
		serve(parse_endpoint(argv[2]), argc == 5 ? parse_u64(argv[4]) : 1, parse_u64(argv[3]), 0,
		      source_conn);
	} else if (strcmp(mode, "flood") == 0 && (argc == 3 || argc == 4)) {
		serve(parse_endpoint(argv[2]), 1, 0, argc == 4 ? parse_u64(argv[3]) : 0, flood_conn);
	} else if (strcmp(mode, "connect") == 0 && (argc == 5 || argc == 6)) {
		run_connect(parse_u64(argv[2]), parse_u64(argv[3]), parse_u64(argv[4]),
			    argc == 6 ? parse_u64(argv[5]) : 1);
	} else if (strcmp(mode, "refused") == 0 && argc == 4) {
		uint64_t t0 = now_ms();
		int fd = vsock_connect(parse_u64(argv[2]), parse_u64(argv[3]));
		int e = errno;
		uint64_t ms = now_ms() - t0;
		say("VT-REFUSED ret=%d err=%s ms=%" PRIu64, fd < 0 ? -1 : 0, fd < 0 ? errname(e) : "none",
		    ms);
		if (fd >= 0)
			close(fd);
	} else {
		usage();
	}
	return 0;
}
