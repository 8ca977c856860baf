/* test_engine.c - the C engine's own tests, against native/shmcache.h only.
 *
 * No framework: CHECK()/CHECK_EQ() print file:line and make the test exit non-zero.
 * Each test runs in a forked child (so one failure or crash does not hide the others,
 * and LeakSanitizer checks every test on its own); the runner prints one line per test
 * and "N passed, M failed" at the end.  Run one test: build/test_engine NAME; run in
 * this process without forking (for gdb): build/test_engine --no-fork [NAME].
 *
 * Every segment is created here with shm_open(O_CREAT|O_EXCL, 0600) under a unique
 * name and shm_unlink()ed before the test returns (also when a CHECK fails).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shmcache.h"

/* ---- tiny harness --------------------------------------------------------------- */

static int g_depth;            /* 0 runner, 1 test process, 2 a test's own child    */
static long g_checks;
static char g_names[32][64];   /* segments this test created (unlinked on failure) */
static int g_nnames;
static int g_seq;

static void unlink_all(void) {
    for (int i = 0; i < g_nnames; i++)
        if (g_names[i][0]) shm_unlink(g_names[i]);
    g_nnames = 0;
}

static void fail_now(void) {
    fflush(stdout);
    fflush(stderr);
    if (g_depth >= 2) _exit(99);           /* a test's child: the test reports it */
    unlink_all();
    exit(1);
}

#define CHECK(cond) do { \
    g_checks++; \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: CHECK(%s) failed [last error: %s]\n", \
                __FILE__, __LINE__, #cond, shm_last_error()); \
        fail_now(); \
    } } while (0)

#define CHECK_EQ(got, want) do { \
    long long g_ = (long long)(got), w_ = (long long)(want); \
    g_checks++; \
    if (g_ != w_) { \
        fprintf(stderr, "%s:%d: %s == %s failed: got %lld, expected %lld " \
                "[last error: %s]\n", __FILE__, __LINE__, #got, #want, g_, w_, \
                shm_last_error()); \
        fail_now(); \
    } } while (0)

/* For behaviour the header leaves open: printed, never fails the run. */
#define NOTE(cond, ...) do { \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: note: ", __FILE__, __LINE__); \
        fprintf(stderr, __VA_ARGS__); \
        fputc('\n', stderr); \
    } } while (0)

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("    ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
}

/* ---- helpers --------------------------------------------------------------------- */

static uint64_t g_rng = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void) {             /* xorshift64* */
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 2685821657736338717ULL;
}
static uint64_t rnd_range(uint64_t lo, uint64_t hi) { return lo + rnd() % (hi - lo + 1); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int64_t real_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static shm_config cfg_of(uint64_t size) {
    shm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.size_bytes = size;
    return cfg;
}

static const char *new_name(void) {
    CHECK(g_nnames < 32);
    char *n = g_names[g_nnames++];
    snprintf(n, 64, "/shmcache-ctest-%d-%d", (int)getpid(), g_seq++);
    return n;
}

static void forget_name(const char *name) {
    for (int i = 0; i < g_nnames; i++)
        if (strcmp(g_names[i], name) == 0) g_names[i][0] = 0;
}

/* A fresh, empty shm object (0600), registered for clean-up. */
static int new_object(const char **name_out) {
    const char *name = new_name();
    int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) fprintf(stderr, "shm_open(%s): %s\n", name, strerror(errno));
    CHECK(fd >= 0);
    *name_out = name;
    return fd;
}

static shm_cache *create_seg(const shm_config *cfg, const char **name_out) {
    int fd = new_object(name_out);
    shm_cache *c = NULL;
    CHECK_EQ(shm_create(fd, cfg, &c), SHM_OK);
    CHECK(c != NULL);
    CHECK_EQ(close(fd), 0);                 /* the engine must not need the fd */
    return c;
}

static shm_cache *attach_seg(const char *name) {
    int fd = shm_open(name, O_RDWR, 0);
    CHECK(fd >= 0);
    shm_cache *c = NULL;
    CHECK_EQ(shm_attach(fd, 2000, &c), SHM_OK);
    CHECK(c != NULL);
    CHECK_EQ(close(fd), 0);
    return c;
}

static void destroy_seg(shm_cache *c, const char *name) {
    shm_close(c);
    CHECK_EQ(shm_unlink(name), 0);
    forget_name(name);
}

static void verify_ok(shm_cache *c) {
    static char report[1 << 16];
    report[0] = 0;
    int n = shm_verify(c, report, sizeof report);
    if (n != 0) fprintf(stderr, "shm_verify found %d problem(s):\n%s\n", n, report);
    CHECK_EQ(n, 0);
}

static shm_stats stats_of(shm_cache *c) {
    shm_stats s;
    memset(&s, 0, sizeof s);
    CHECK_EQ(shm_stats_get(c, &s), SHM_OK);
    return s;
}

static shm_config config_of(shm_cache *c) {
    shm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    CHECK_EQ(shm_get_config(c, &cfg), SHM_OK);
    return cfg;
}

/* Self-describing values: [u32 len][u32 seed] then bytes derived from both, so any
 * value read back can be checked without knowing what was written (torn writes show). */
static void fill_value(char *v, uint64_t n, uint32_t seed) {
    uint32_t len32 = (uint32_t)n;
    if (n >= 8) {
        memcpy(v, &len32, 4);
        memcpy(v + 4, &seed, 4);
    }
    for (uint64_t i = (n >= 8 ? 8 : 0); i < n; i++)
        v[i] = (char)(uint8_t)((seed * 31u) ^ (uint32_t)(i * 7u) ^ (uint32_t)(i >> 8));
}

static int value_ok(const char *v, uint64_t n, uint32_t *seed_out) {
    if (n < 8) return 0;
    uint32_t len32, seed;
    memcpy(&len32, v, 4);
    memcpy(&seed, v + 4, 4);
    if (len32 != n) return 0;
    for (uint64_t i = 8; i < n; i++)
        if (v[i] != (char)(uint8_t)((seed * 31u) ^ (uint32_t)(i * 7u) ^ (uint32_t)(i >> 8)))
            return 0;
    if (seed_out) *seed_out = seed;
    return 1;
}

static uint32_t key_of(char *buf, const char *prefix, uint64_t i) {
    return (uint32_t)snprintf(buf, 64, "%s:%" PRIu64, prefix, i);
}

static int set_simple(shm_cache *c, const char *key, const char *val) {
    return shm_set(c, key, (uint32_t)strlen(key), val, strlen(val), 0, 0, SHM_SET, 0, NULL);
}

/* Expect key -> exactly the C string want. */
static void expect_value(shm_cache *c, const char *key, const char *want) {
    char buf[256];
    int64_t n = shm_get(c, key, (uint32_t)strlen(key), buf, sizeof buf, NULL);
    if (n != (int64_t)strlen(want))
        fprintf(stderr, "get(%s): got length %lld, expected %zu\n", key, (long long)n,
                strlen(want));
    CHECK_EQ(n, (int64_t)strlen(want));
    CHECK(memcmp(buf, want, strlen(want)) == 0);
}

static void expect_miss(shm_cache *c, const char *key) {
    char buf[16];
    CHECK_EQ(shm_get(c, key, (uint32_t)strlen(key), buf, sizeof buf, NULL), SHM_MISS);
}

static int64_t get_alloc(shm_cache *c, const char *key, uint32_t klen, char **out) {
    uint64_t cap = 64;
    char *buf = malloc(cap);
    CHECK(buf != NULL);
    for (;;) {
        int64_t n = shm_get(c, key, klen, buf, cap, NULL);
        if (n < 0 || (uint64_t)n <= cap) {
            *out = buf;
            return n;
        }
        free(buf);
        cap = (uint64_t)n;
        buf = malloc(cap);
        CHECK(buf != NULL);
    }
}

/* ---- tests -------------------------------------------------------------------------- */

static void test_misc(void) {
    CHECK(shm_layout_version() > 0);
    CHECK_EQ(shm_hash("abc", 3), shm_hash("abc", 3));
    CHECK(shm_hash("abc", 3) != shm_hash("abd", 3));
    CHECK(shm_hash("", 0) != shm_hash("a", 1));
    CHECK(shm_last_error() != NULL);

    /* Configurations the header rules out are refused with SHM_EINVAL. */
    struct { const char *what; shm_config cfg; } bad[6];
    for (int i = 0; i < 6; i++) bad[i].cfg = cfg_of(8 << 20);
    bad[0].what = "stripes not a power of two"; bad[0].cfg.nstripes = 3;
    bad[1].what = "page_bytes not a power of two"; bad[1].cfg.page_bytes = 50000;
    bad[2].what = "max_key_len > 65535"; bad[2].cfg.max_key_len = 65536;
    bad[3].what = "unknown policy"; bad[3].cfg.policy = 99;
    bad[4].what = "size far too small"; bad[4].cfg.size_bytes = 1024;
    bad[5].what = "unknown config flag"; bad[5].cfg.flags = 0x80;
    for (int i = 0; i < 6; i++) {
        const char *name;
        int fd = new_object(&name);
        shm_cache *c = NULL;
        int rc = shm_create(fd, &bad[i].cfg, &c);
        if (rc != SHM_EINVAL) fprintf(stderr, "config '%s': rc %d\n", bad[i].what, rc);
        CHECK_EQ(rc, SHM_EINVAL);
        CHECK(c == NULL);
        CHECK(strlen(shm_last_error()) > 0);
        CHECK_EQ(close(fd), 0);
        CHECK_EQ(shm_unlink(name), 0);
        forget_name(name);
    }
    shm_config good = cfg_of(8 << 20);
    shm_cache *c = NULL;
    CHECK(shm_create(-1, &good, &c) < 0);                   /* bad descriptor */
    CHECK(c == NULL);
}

static void test_create_attach(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *a = create_seg(&cfg, &name);

    shm_config got = config_of(a);
    CHECK_EQ(got.size_bytes, 8 << 20);
    CHECK_EQ(got.max_key_len, 250);
    CHECK_EQ(got.max_slots, 256);
    CHECK_EQ(got.lock_timeout_ms, 10000);
    CHECK_EQ(got.page_bytes, 65536);
    CHECK(got.policy >= SHM_POLICY_LRU && got.policy <= SHM_POLICY_S3FIFO);
    CHECK(got.nstripes > 0 && (got.nstripes & (got.nstripes - 1)) == 0);
    CHECK(got.max_value_len > 0 && got.max_value_len < got.size_bytes);

    struct stat st;
    int fd = shm_open(name, O_RDWR, 0);
    CHECK(fd >= 0);
    CHECK_EQ(fstat(fd, &st), 0);
    CHECK_EQ(st.st_size, 8 << 20);                /* create sized the object */
    CHECK_EQ(st.st_mode & 0777, 0600);
    shm_cache *b = NULL;
    CHECK_EQ(shm_attach(fd, 1000, &b), SHM_OK);
    CHECK(b != NULL && b != a);
    CHECK_EQ(close(fd), 0);

    /* Same data through both handles, at different addresses. */
    CHECK_EQ(set_simple(a, "hello", "world"), SHM_OK);
    expect_value(b, "hello", "world");
    CHECK_EQ(set_simple(b, "from-b", "bbb"), SHM_OK);
    expect_value(a, "from-b", "bbb");

    const char *pa = NULL, *pb = NULL;
    uint64_t la = 0, lb = 0;
    uint32_t ia = 0, ib = 0;
    shm_item_info info;
    CHECK_EQ(shm_pin(a, "hello", 5, &pa, &la, &info, &ia), SHM_OK);
    CHECK_EQ(shm_pin(b, "hello", 5, &pb, &lb, &info, &ib), SHM_OK);
    CHECK_EQ(la, 5);
    CHECK_EQ(lb, 5);
    CHECK(pa != pb);                               /* two mappings */
    CHECK(memcmp(pa, "world", 5) == 0 && memcmp(pb, "world", 5) == 0);
    CHECK_EQ(shm_unpin(a, ia), SHM_OK);
    CHECK_EQ(shm_unpin(b, ib), SHM_OK);

    shm_config gb = config_of(b);
    CHECK(memcmp(&gb, &got, sizeof gb) == 0);
    shm_stats s = stats_of(b);
    CHECK(s.live_slots >= 1);
    CHECK_EQ(s.size_bytes, 8 << 20);
    CHECK_EQ(s.entries, 2);
    verify_ok(b);
    shm_close(b);

    /* The creator's handle keeps working after another handle closed. */
    expect_value(a, "from-b", "bbb");

    /* attach of a name that does not exist is the caller's shm_open failing; attach on
     * a bad descriptor must fail cleanly. */
    b = NULL;
    CHECK(shm_attach(-1, 0, &b) < 0);
    CHECK(b == NULL);
    destroy_seg(a, name);
}

static void test_basic_ops(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    char buf[256];
    shm_item_info info;
    uint64_t v1 = 0, v2 = 0, v3 = 0;
    const char *tls = NULL;

    expect_miss(c, "k");
    CHECK_EQ(shm_info(c, "k", 1, &info), SHM_MISS);
    CHECK_EQ(shm_set(c, "k", 1, "one", 3, 0, 0x1234, SHM_SET, 0, &v1), SHM_OK);
    CHECK(v1 != 0);
    memset(&info, 0xff, sizeof info);
    CHECK_EQ(shm_get(c, "k", 1, buf, sizeof buf, &info), 3);
    CHECK(memcmp(buf, "one", 3) == 0);
    CHECK_EQ(info.version, v1);
    CHECK_EQ(info.value_len, 3);
    CHECK_EQ(info.flags, 0x1234);
    CHECK_EQ(info.expires_at_ms, 0);
    CHECK_EQ(shm_info(c, "k", 1, &info), SHM_OK);
    CHECK_EQ(info.version, v1);

    /* overwrite bumps the version */
    CHECK_EQ(shm_set(c, "k", 1, "two!", 4, 0, 0, SHM_SET, 0, &v2), SHM_OK);
    CHECK(v2 > v1);
    expect_value(c, "k", "two!");

    /* buffer too small: length returned, caller retries */
    memset(buf, 'x', sizeof buf);
    CHECK_EQ(shm_get(c, "k", 1, buf, 2, NULL), 4);
    CHECK_EQ(shm_get(c, "k", 1, buf, 4, NULL), 4);
    CHECK(memcmp(buf, "two!", 4) == 0);

    CHECK_EQ(shm_get_tls(c, "k", 1, &tls), 4);
    CHECK(tls != NULL && memcmp(tls, "two!", 4) == 0);
    CHECK_EQ(shm_get_tls(c, "nope", 4, &tls), SHM_MISS);

    /* empty value is a value */
    CHECK_EQ(shm_set(c, "empty", 5, "", 0, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_get(c, "empty", 5, buf, sizeof buf, NULL), 0);
    CHECK_EQ(shm_contains(c, "empty", 5), 1);
    CHECK_EQ(shm_info(c, "empty", 5, &info), SHM_OK);
    CHECK_EQ(info.value_len, 0);
    CHECK_EQ(shm_get_tls(c, "empty", 5, &tls), 0);
    CHECK_EQ(shm_get(c, "empty", 5, NULL, 0, NULL), 0);

    /* binary keys and values */
    const char bk[4] = {0, 1, 2, (char)0xff};
    const char bv[5] = {(char)0xff, 0, 0, 7, 0};
    CHECK_EQ(shm_set(c, bk, 4, bv, 5, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_get(c, bk, 4, buf, sizeof buf, NULL), 5);
    CHECK(memcmp(buf, bv, 5) == 0);
    CHECK_EQ(shm_get(c, bk, 3, buf, sizeof buf, NULL), SHM_MISS);   /* prefix != key */

    /* add / replace */
    CHECK_EQ(shm_set(c, "k", 1, "x", 1, 0, 0, SHM_ADD, 0, NULL), SHM_EEXISTS);
    expect_value(c, "k", "two!");
    CHECK_EQ(shm_set(c, "new", 3, "n", 1, 0, 0, SHM_ADD, 0, NULL), SHM_OK);
    expect_value(c, "new", "n");
    CHECK_EQ(shm_set(c, "absent", 6, "r", 1, 0, 0, SHM_REPLACE, 0, NULL), SHM_MISS);
    expect_miss(c, "absent");
    CHECK_EQ(shm_set(c, "new", 3, "N2", 2, 0, 0, SHM_REPLACE, 0, NULL), SHM_OK);
    expect_value(c, "new", "N2");
    CHECK_EQ(shm_set(c, "k", 1, "x", 1, 0, 0, 7, 0, NULL), SHM_EINVAL);   /* bad mode */

    /* compare-and-set */
    CHECK_EQ(shm_set(c, "k", 1, "cas", 3, 0, 0, SHM_SET, v1, NULL), SHM_EVERSION);
    expect_value(c, "k", "two!");
    CHECK_EQ(shm_set(c, "k", 1, "cas", 3, 0, 0, SHM_SET, v2, &v3), SHM_OK);
    CHECK(v3 > v2);
    expect_value(c, "k", "cas");

    /* delete, incl. versioned delete */
    CHECK_EQ(shm_delete(c, "k", 1, v2), SHM_EVERSION);
    expect_value(c, "k", "cas");
    CHECK_EQ(shm_delete(c, "k", 1, v3), SHM_OK);
    expect_miss(c, "k");
    CHECK_EQ(shm_delete(c, "k", 1, 0), SHM_MISS);
    CHECK_EQ(set_simple(c, "k", "again"), SHM_OK);
    CHECK_EQ(shm_info(c, "k", 1, &info), SHM_OK);
    CHECK(info.version > v3);                           /* versions never reused */
    CHECK_EQ(shm_delete(c, "k", 1, 0), SHM_OK);

    /* touch bumps the version, keeps the value */
    CHECK_EQ(set_simple(c, "t", "tv"), SHM_OK);
    CHECK_EQ(shm_info(c, "t", 1, &info), SHM_OK);
    uint64_t vt = info.version;
    CHECK_EQ(shm_touch(c, "t", 1, 60000), SHM_OK);
    CHECK_EQ(shm_info(c, "t", 1, &info), SHM_OK);
    CHECK(info.version > vt);
    CHECK(info.expires_at_ms > 0);
    expect_value(c, "t", "tv");
    CHECK_EQ(shm_touch(c, "missing", 7, 1000), SHM_MISS);

    /* counters */
    shm_stats s = stats_of(c);
    CHECK(s.total.hits > 0 && s.total.misses > 0 && s.total.sets > 0);
    CHECK(s.total.deletes >= 2 && s.total.touches >= 1);
    CHECK_EQ(s.entries, (uint64_t)shm_count(c));
    verify_ok(c);
    destroy_seg(c, name);
}

static void test_incr(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    int64_t r = 0;

    CHECK_EQ(shm_incr(c, "n", 1, 1, 0, 0, 0, &r), SHM_MISS);
    expect_miss(c, "n");
    CHECK_EQ(shm_incr(c, "n", 1, 5, 1, 10, 0, &r), SHM_OK);
    CHECK_EQ(r, 15);
    expect_value(c, "n", "15");
    CHECK_EQ(shm_incr(c, "n", 1, -20, 0, 0, 0, &r), SHM_OK);
    CHECK_EQ(r, -5);
    expect_value(c, "n", "-5");
    CHECK_EQ(shm_incr(c, "n", 1, 5, 1, 1000, 0, &r), SHM_OK);   /* exists: initial unused */
    CHECK_EQ(r, 0);
    expect_value(c, "n", "0");

    CHECK_EQ(set_simple(c, "s", "41"), SHM_OK);
    CHECK_EQ(shm_incr(c, "s", 1, 1, 0, 0, 0, &r), SHM_OK);
    CHECK_EQ(r, 42);
    expect_value(c, "s", "42");

    CHECK_EQ(set_simple(c, "bad", "abc"), SHM_OK);
    CHECK_EQ(shm_incr(c, "bad", 3, 1, 0, 0, 0, &r), SHM_ENOTNUM);
    expect_value(c, "bad", "abc");
    CHECK_EQ(set_simple(c, "bad2", "12x"), SHM_OK);
    CHECK_EQ(shm_incr(c, "bad2", 4, 1, 0, 0, 0, &r), SHM_ENOTNUM);
    CHECK_EQ(set_simple(c, "bad3", ""), SHM_OK);
    CHECK_EQ(shm_incr(c, "bad3", 4, 1, 0, 0, 0, &r), SHM_ENOTNUM);

    CHECK_EQ(set_simple(c, "max", "9223372036854775807"), SHM_OK);
    CHECK_EQ(shm_incr(c, "max", 3, 1, 0, 0, 0, &r), SHM_EOVERFLOW);
    expect_value(c, "max", "9223372036854775807");
    CHECK_EQ(shm_incr(c, "max", 3, -1, 0, 0, 0, &r), SHM_OK);
    CHECK_EQ(r, INT64_MAX - 1);
    CHECK_EQ(set_simple(c, "min", "-9223372036854775808"), SHM_OK);
    CHECK_EQ(shm_incr(c, "min", 3, -1, 0, 0, 0, &r), SHM_EOVERFLOW);
    expect_value(c, "min", "-9223372036854775808");
    CHECK_EQ(shm_incr(c, "min", 3, INT64_MAX, 0, 0, 0, &r), SHM_OK);
    CHECK_EQ(r, -1);
    CHECK_EQ(shm_incr(c, "fresh", 5, 1, 1, INT64_MAX, 0, &r), SHM_EOVERFLOW);
    expect_miss(c, "fresh");

    CHECK_EQ(set_simple(c, "huge", "99999999999999999999"), SHM_OK);
    int rc = shm_incr(c, "huge", 4, 1, 0, 0, 0, &r);
    CHECK(rc == SHM_ENOTNUM || rc == SHM_EOVERFLOW);

    /* create with a TTL, on a fixed clock */
    int64_t t0 = real_ms() + 86400000;
    shm_set_clock(c, t0);
    CHECK_EQ(shm_now_ms(c), t0);
    CHECK_EQ(shm_incr(c, "ttl", 3, 1, 1, 0, 1000, &r), SHM_OK);
    CHECK_EQ(r, 1);
    shm_item_info info;
    CHECK_EQ(shm_info(c, "ttl", 3, &info), SHM_OK);
    CHECK_EQ(info.expires_at_ms, t0 + 1000);
    shm_set_clock(c, t0 + 2000);
    CHECK_EQ(shm_incr(c, "ttl", 3, 1, 0, 0, 0, &r), SHM_MISS);
    shm_set_clock(c, 0);

    shm_stats s = stats_of(c);
    CHECK(s.total.incrs >= 6);
    verify_ok(c);
    destroy_seg(c, name);
}

static void test_contains_count_clear(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    char k[64];
    CHECK_EQ(shm_count(c), 0);
    for (uint64_t i = 0; i < 500; i++) {
        uint32_t kl = key_of(k, "c", i);
        CHECK_EQ(shm_set(c, k, kl, k, kl, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    }
    CHECK_EQ(shm_count(c), 500);
    shm_stats before = stats_of(c);
    CHECK_EQ(shm_contains(c, "c:7", 3), 1);
    CHECK_EQ(shm_contains(c, "c:500", 5), 0);
    CHECK_EQ(shm_contains(c, "", 0), SHM_EKEYLEN);
    shm_stats after = stats_of(c);
    CHECK_EQ(after.total.hits, before.total.hits);     /* contains is not a read */
    CHECK_EQ(after.total.misses, before.total.misses);

    CHECK_EQ(shm_delete(c, "c:7", 3, 0), SHM_OK);
    CHECK_EQ(shm_contains(c, "c:7", 3), 0);
    CHECK_EQ(shm_count(c), 499);

    CHECK_EQ(shm_clear(c), SHM_OK);
    CHECK_EQ(shm_count(c), 0);
    CHECK_EQ(shm_contains(c, "c:8", 3), 0);
    expect_miss(c, "c:9");
    shm_stats s = stats_of(c);
    CHECK_EQ(s.entries, 0);
    CHECK_EQ(s.used_bytes, 0);
    verify_ok(c);
    /* usable after clear */
    CHECK_EQ(set_simple(c, "after", "clear"), SHM_OK);
    expect_value(c, "after", "clear");
    CHECK_EQ(shm_count(c), 1);
    CHECK_EQ(shm_clear(c), SHM_OK);
    CHECK_EQ(shm_clear(c), SHM_OK);
    CHECK_EQ(shm_count(c), 0);
    verify_ok(c);
    destroy_seg(c, name);
}

static void test_ttl(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    shm_cache *other = attach_seg(name);
    shm_item_info info;
    const int64_t t0 = real_ms() + 10LL * 86400000;     /* ten days ahead */

    shm_set_clock(c, t0);
    CHECK_EQ(shm_now_ms(c), t0);
    int64_t rn = shm_now_ms(other);
    CHECK(rn > 0 && rn < t0);                             /* the clock is per handle */

    CHECK_EQ(shm_set(c, "a", 1, "A", 1, 1000, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_info(c, "a", 1, &info), SHM_OK);
    CHECK_EQ(info.expires_at_ms, t0 + 1000);
    shm_set_clock(c, t0 + 999);
    expect_value(c, "a", "A");
    CHECK_EQ(shm_contains(c, "a", 1), 1);
    expect_value(other, "a", "A");                        /* real time: not expired */

    shm_set_clock(c, t0 + 1000);                          /* expires_at <= now: gone */
    CHECK_EQ(shm_contains(c, "a", 1), 0);
    shm_stats s0 = stats_of(c);
    expect_miss(c, "a");
    shm_stats s1 = stats_of(c);
    CHECK_EQ(shm_info(c, "a", 1, &info), SHM_MISS);
    CHECK_EQ(s1.total.misses, s0.total.misses + 1);
    CHECK_EQ(s1.total.evictions[SHM_REASON_EXPIRED_READ],
             s0.total.evictions[SHM_REASON_EXPIRED_READ] + 1);
    CHECK_EQ(shm_count(c), 0);

    /* touch: extend, then remove the expiry */
    shm_set_clock(c, t0);
    CHECK_EQ(shm_set(c, "b", 1, "B", 1, 1000, 0, SHM_SET, 0, NULL), SHM_OK);
    shm_set_clock(c, t0 + 500);
    CHECK_EQ(shm_touch(c, "b", 1, 2000), SHM_OK);
    CHECK_EQ(shm_info(c, "b", 1, &info), SHM_OK);
    CHECK_EQ(info.expires_at_ms, t0 + 2500);
    shm_set_clock(c, t0 + 2000);
    expect_value(c, "b", "B");
    CHECK_EQ(shm_touch(c, "b", 1, 0), SHM_OK);
    CHECK_EQ(shm_info(c, "b", 1, &info), SHM_OK);
    CHECK_EQ(info.expires_at_ms, 0);
    shm_set_clock(c, t0 + 1000000000LL);
    expect_value(c, "b", "B");

    /* expired entries cannot be touched, replaced or added over as if present */
    shm_set_clock(c, t0);
    CHECK_EQ(shm_set(c, "e", 1, "E", 1, 10, 0, SHM_SET, 0, NULL), SHM_OK);
    shm_set_clock(c, t0 + 10);
    CHECK_EQ(shm_touch(c, "e", 1, 1000), SHM_MISS);
    CHECK_EQ(shm_set(c, "e", 1, "R", 1, 0, 0, SHM_REPLACE, 0, NULL), SHM_MISS);
    CHECK_EQ(shm_set(c, "e", 1, "A", 1, 0, 0, SHM_ADD, 0, NULL), SHM_OK);
    expect_value(c, "e", "A");

    /* a negative TTL means no expiry */
    CHECK_EQ(shm_set(c, "neg", 3, "N", 1, -5, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_info(c, "neg", 3, &info), SHM_OK);
    CHECK_EQ(info.expires_at_ms, 0);

    shm_set_clock(c, 0);
    int64_t r = shm_now_ms(c);
    CHECK(r > 0 && r < t0);
    verify_ok(c);
    shm_close(other);
    destroy_seg(c, name);
}

static void test_sweep_expired(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    const int64_t t0 = real_ms() + 86400000;
    char k[64];
    shm_set_clock(c, t0);
    for (uint64_t i = 0; i < 150; i++) {
        uint32_t kl = key_of(k, i < 100 ? "ttl" : "keep", i);
        CHECK_EQ(shm_set(c, k, kl, "v", 1, i < 100 ? 1000 : 0, 0, SHM_SET, 0, NULL), SHM_OK);
    }
    CHECK_EQ(shm_count(c), 150);
    CHECK_EQ(shm_sweep_expired(c, 0), 0);                 /* nothing expired yet */
    shm_set_clock(c, t0 + 5000);
    int64_t first = shm_sweep_expired(c, 10);
    CHECK(first >= 1 && first <= 10);
    int64_t rest = shm_sweep_expired(c, 0);
    CHECK_EQ(first + rest, 100);
    CHECK_EQ(shm_sweep_expired(c, 0), 0);
    CHECK_EQ(shm_count(c), 50);
    shm_stats s = stats_of(c);
    CHECK_EQ(s.entries, 50);
    CHECK_EQ(s.total.evictions[SHM_REASON_EXPIRED_SWEEP], 100);
    CHECK_EQ(s.total.evictions[SHM_REASON_CAPACITY], 0);
    for (uint64_t i = 100; i < 150; i++) {
        uint32_t kl = key_of(k, "keep", i);
        CHECK_EQ(shm_contains(c, k, kl), 1);
    }
    verify_ok(c);
    destroy_seg(c, name);
}

static void test_pin(void) {
    const char *name;
    shm_config cfg = cfg_of(4 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    int my = shm_my_slot(c);
    CHECK(my >= 0);
    shm_slot_stats ss;

    static char small[5000], large[200000], tmp[200000];
    fill_value(small, sizeof small, 111);
    fill_value(large, sizeof large, 222);
    CHECK_EQ(shm_set(c, "ps", 2, small, sizeof small, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_set(c, "pl", 2, large, sizeof large, 0, 0, SHM_SET, 0, NULL), SHM_OK);

    const char *ps = NULL, *pl = NULL;
    uint64_t ls = 0, ll = 0;
    uint32_t is = 0, il = 0;
    shm_item_info info;
    CHECK_EQ(shm_pin(c, "ps", 2, &ps, &ls, &info, &is), SHM_OK);
    CHECK_EQ(ls, sizeof small);
    CHECK_EQ(info.value_len, sizeof small);
    CHECK_EQ(shm_pin(c, "pl", 2, &pl, &ll, &info, &il), SHM_OK);
    CHECK_EQ(ll, sizeof large);
    CHECK(is != il);
    CHECK_EQ(shm_pin(c, "none", 4, &ps, &ls, &info, &is), SHM_MISS);
    CHECK(ps != NULL && ls == sizeof small);               /* untouched on a miss */
    CHECK_EQ(shm_slot_stats_get(c, (uint32_t)my, &ss), SHM_OK);
    CHECK_EQ(ss.pins, 2);

    /* delete one, overwrite the other, then churn through the segment twice */
    CHECK_EQ(shm_delete(c, "ps", 2, 0), SHM_OK);
    CHECK_EQ(shm_contains(c, "ps", 2), 0);
    fill_value(tmp, sizeof large, 333);
    CHECK_EQ(shm_set(c, "pl", 2, tmp, sizeof large, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    char k[64];
    for (uint64_t i = 0; i < 2000; i++) {
        uint64_t n = (i % 10 == 0) ? 150000 : rnd_range(100, 6000);
        fill_value(tmp, n, (uint32_t)i);
        uint32_t kl = key_of(k, "churn", i);
        CHECK_EQ(shm_set(c, k, kl, tmp, n, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    }
    CHECK(memcmp(ps, small, sizeof small) == 0);
    CHECK(memcmp(pl, large, sizeof large) == 0);
    char *got = NULL;
    int64_t n = get_alloc(c, "pl", 2, &got);
    NOTE(n == (int64_t)sizeof large, "pl evicted during churn (n=%lld)", (long long)n);
    if (n == (int64_t)sizeof large) {
        uint32_t seed = 0;
        CHECK(value_ok(got, (uint64_t)n, &seed));
        CHECK_EQ(seed, 333);
    }
    free(got);
    verify_ok(c);

    CHECK_EQ(shm_unpin(c, is), SHM_OK);
    CHECK_EQ(shm_unpin(c, il), SHM_OK);
    CHECK(shm_unpin(c, is) < 0);                              /* not pinned any more */
    CHECK(shm_unpin(c, 0xdeadbeef) < 0);
    CHECK_EQ(shm_slot_stats_get(c, (uint32_t)my, &ss), SHM_OK);
    CHECK_EQ(ss.pins, 0);
    verify_ok(c);

    /* a pin survives clear() too, and the memory comes back afterwards */
    CHECK_EQ(shm_set(c, "pc", 2, small, sizeof small, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_pin(c, "pc", 2, &ps, &ls, &info, &is), SHM_OK);
    CHECK_EQ(shm_clear(c), SHM_OK);
    CHECK_EQ(shm_count(c), 0);
    for (uint64_t i = 0; i < 300; i++) {
        fill_value(tmp, 5000, (uint32_t)i);
        uint32_t kl = key_of(k, "after", i);
        CHECK_EQ(shm_set(c, k, kl, tmp, 5000, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    }
    CHECK(memcmp(ps, small, sizeof small) == 0);
    CHECK_EQ(shm_unpin(c, is), SHM_OK);
    CHECK_EQ(shm_clear(c), SHM_OK);
    shm_stats s = stats_of(c);
    CHECK_EQ(s.used_bytes, 0);
    CHECK_EQ(s.entries, 0);
    verify_ok(c);

    /* many pins at once (more than a slot can hold must fail cleanly, not corrupt) */
    CHECK_EQ(set_simple(c, "many", "m"), SHM_OK);
    uint32_t ids[300];
    int held = 0, rc = 0;
    for (int i = 0; i < 300; i++) {
        const char *p;
        uint64_t l;
        rc = shm_pin(c, "many", 4, &p, &l, &info, &ids[held]);
        if (rc != SHM_OK) break;
        held++;
    }
    CHECK(held >= 64);
    if (held < 300) CHECK(rc < 0 && rc != SHM_MISS);
    for (int i = 0; i < held; i++) CHECK_EQ(shm_unpin(c, ids[i]), SHM_OK);
    CHECK_EQ(shm_slot_stats_get(c, (uint32_t)my, &ss), SHM_OK);
    CHECK_EQ(ss.pins, 0);
    verify_ok(c);
    destroy_seg(c, name);
}

static void test_keys(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    enum { N = 1000 };
    static unsigned char seen[N];
    char k[64];
    for (uint64_t i = 0; i < N; i++) {
        uint32_t kl = key_of(k, "key", i);
        CHECK_EQ(shm_set(c, k, kl, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    }
    /* a few that are expired by the time we iterate */
    const int64_t t0 = real_ms() + 86400000;
    shm_set_clock(c, t0);
    for (uint64_t i = 0; i < 10; i++) {
        uint32_t kl = key_of(k, "gone", i);
        CHECK_EQ(shm_set(c, k, kl, "v", 1, 100, 0, SHM_SET, 0, NULL), SHM_OK);
    }
    shm_set_clock(c, t0 + 1000);

    uint64_t cursor = 0;
    char buf[300];                       /* small: forces many calls */
    long total = 0, calls = 0, expired_seen = 0;
    do {
        int n = shm_keys(c, &cursor, buf, sizeof buf);
        CHECK(n >= 0);
        calls++;
        CHECK(calls < 100000);
        uint64_t pos = 0;
        for (int j = 0; j < n; j++) {
            uint16_t kl;
            CHECK(pos + 2 <= sizeof buf);
            memcpy(&kl, buf + pos, 2);
            CHECK(pos + 2 + kl <= sizeof buf);
            char key[64] = {0};
            CHECK(kl > 0 && kl < sizeof key);
            memcpy(key, buf + pos + 2, kl);
            pos += 2 + (uint64_t)kl;
            unsigned long idx;
            if (sscanf(key, "key:%lu", &idx) == 1) {
                CHECK(idx < N);
                CHECK_EQ(seen[idx], 0);                 /* each key once */
                seen[idx] = 1;
                total++;
            } else {
                CHECK(strncmp(key, "gone:", 5) == 0);
                expired_seen++;
            }
        }
    } while (cursor != 0);
    CHECK_EQ(total, N);
    CHECK(calls > 1);
    NOTE(expired_seen == 0, "shm_keys returned %ld expired keys", expired_seen);

    /* a buffer too small for any record is an error, not an endless walk */
    cursor = 0;
    int rc = shm_keys(c, &cursor, buf, 1);
    CHECK(rc <= 0);

    /* empty segment: one call, zero keys, cursor back at 0 */
    CHECK_EQ(shm_clear(c), SHM_OK);
    cursor = 0;
    long zero_total = 0;
    calls = 0;
    do {
        int n = shm_keys(c, &cursor, buf, sizeof buf);
        CHECK(n >= 0);
        zero_total += n;
        CHECK(++calls < 100000);
    } while (cursor != 0);
    CHECK_EQ(zero_total, 0);
    shm_set_clock(c, 0);
    destroy_seg(c, name);
}

static void test_limits(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    shm_config got = config_of(c);
    static char key[300];
    memset(key, 'k', sizeof key);
    char buf[16];
    int64_t r;

    CHECK_EQ(shm_set(c, key, 250, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_get(c, key, 250, buf, sizeof buf, NULL), 1);
    CHECK_EQ(shm_set(c, key, 251, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_EKEYLEN);
    CHECK(strlen(shm_last_error()) > 0);
    CHECK_EQ(shm_set(c, key, 0, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_EKEYLEN);
    CHECK_EQ(shm_get(c, key, 251, buf, sizeof buf, NULL), SHM_EKEYLEN);
    CHECK_EQ(shm_get(c, key, 0, buf, sizeof buf, NULL), SHM_EKEYLEN);
    CHECK_EQ(shm_delete(c, key, 251, 0), SHM_EKEYLEN);
    CHECK_EQ(shm_touch(c, key, 251, 0), SHM_EKEYLEN);
    CHECK_EQ(shm_incr(c, key, 251, 1, 1, 0, 0, &r), SHM_EKEYLEN);
    CHECK_EQ(shm_contains(c, key, 251), SHM_EKEYLEN);
    shm_item_info info;
    CHECK_EQ(shm_info(c, key, 251, &info), SHM_EKEYLEN);

    uint64_t maxv = got.max_value_len;
    char *big = malloc(maxv + 1);
    CHECK(big != NULL);
    fill_value(big, maxv + 1, 5);
    CHECK_EQ(shm_set(c, "big", 3, big, maxv + 1, 0, 0, SHM_SET, 0, NULL), SHM_EVALLEN);
    CHECK(strlen(shm_last_error()) > 0);
    fill_value(big, maxv, 6);
    CHECK_EQ(shm_set(c, "big", 3, big, maxv, 0, 0, SHM_SET, 0, NULL), SHM_OK);  /* fits */
    char *back = NULL;
    CHECK_EQ(get_alloc(c, "big", 3, &back), (int64_t)maxv);
    CHECK(memcmp(back, big, maxv) == 0);
    free(back);
    shm_stats s = stats_of(c);
    CHECK_EQ(s.total.set_failures, 0);
    free(big);
    verify_ok(c);
    destroy_seg(c, name);

    /* configured limits */
    shm_config small = cfg_of(8 << 20);
    small.max_key_len = 16;
    small.max_value_len = 1000;
    c = create_seg(&small, &name);
    got = config_of(c);
    CHECK_EQ(got.max_key_len, 16);
    CHECK_EQ(got.max_value_len, 1000);
    CHECK_EQ(shm_set(c, key, 16, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_set(c, key, 17, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_EKEYLEN);
    static char v[1001];
    CHECK_EQ(shm_set(c, "v", 1, v, 1000, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_set(c, "v", 1, v, 1001, 0, 0, SHM_SET, 0, NULL), SHM_EVALLEN);
    destroy_seg(c, name);

    /* the largest key length the format allows */
    shm_config wide = cfg_of(8 << 20);
    wide.max_key_len = 65535;
    c = create_seg(&wide, &name);
    char *wk = malloc(65536);
    CHECK(wk != NULL);
    memset(wk, 'w', 65536);
    CHECK_EQ(shm_set(c, wk, 65535, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_get(c, wk, 65535, buf, sizeof buf, NULL), 1);
    CHECK_EQ(shm_set(c, wk, 65536, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_EKEYLEN);
    free(wk);
    verify_ok(c);
    destroy_seg(c, name);
}

/* Write `total` bytes of values into a segment much smaller than that.  Every set must
 * succeed (eviction makes room), and the key just written must read back intact. */
static void churn(shm_cache *c, const char *prefix, uint64_t total, uint64_t lo, uint64_t hi,
                  uint64_t *written_keys) {
    char *v = malloc(hi);
    char k[64];
    CHECK(v != NULL);
    uint64_t done = 0, i = 0;
    while (done < total) {
        uint64_t n = rnd_range(lo, hi);
        uint32_t seed = (uint32_t)rnd();
        fill_value(v, n, seed);
        uint32_t kl = key_of(k, prefix, i);
        int rc = shm_set(c, k, kl, v, n, 0, 0, SHM_SET, 0, NULL);
        if (rc != SHM_OK)
            fprintf(stderr, "set #%" PRIu64 " (%" PRIu64 " bytes) after %" PRIu64
                    " bytes written: rc %d\n", i, n, done, rc);
        CHECK_EQ(rc, SHM_OK);
        if (i % 97 == 0) {
            char *got = NULL;
            int64_t g = get_alloc(c, k, kl, &got);
            CHECK_EQ(g, (int64_t)n);
            uint32_t s2 = 0;
            CHECK(value_ok(got, n, &s2));
            CHECK_EQ(s2, seed);
            free(got);
        }
        done += n;
        i++;
    }
    free(v);
    if (written_keys) *written_keys = i;
}

/* Every entry still present must be intact. */
static uint64_t check_all(shm_cache *c, const char *prefix, uint64_t nkeys) {
    char k[64];
    uint64_t present = 0;
    for (uint64_t i = 0; i < nkeys; i++) {
        uint32_t kl = key_of(k, prefix, i);
        char *got = NULL;
        int64_t g = get_alloc(c, k, kl, &got);
        if (g == SHM_MISS) {
            free(got);
            continue;
        }
        CHECK(g >= 0);
        CHECK(value_ok(got, (uint64_t)g, NULL));
        free(got);
        present++;
    }
    return present;
}

static void test_eviction_fill(void) {
    static const uint32_t policies[3] = {SHM_POLICY_LRU, SHM_POLICY_SIEVE, SHM_POLICY_S3FIFO};
    static const char *pnames[3] = {"lru", "sieve", "s3fifo"};
    for (int p = 0; p < 3; p++) {
        const char *name;
        shm_config cfg = cfg_of(4 << 20);
        cfg.policy = policies[p];
        shm_cache *c = create_seg(&cfg, &name);
        CHECK_EQ(config_of(c).policy, policies[p]);
        uint64_t nkeys = 0;
        double t = now_s();
        churn(c, "e", 40ull << 20, 16, 3000, &nkeys);      /* 10x the segment */
        verify_ok(c);
        shm_stats s = stats_of(c);
        CHECK_EQ(s.policy, policies[p]);
        CHECK(s.total.evictions[SHM_REASON_CAPACITY] + s.total.evictions[SHM_REASON_REBALANCE] > 0);
        CHECK_EQ(s.total.set_failures, 0);
        CHECK(s.entries > 0);
        CHECK_EQ(s.entries, (uint64_t)shm_count(c));
        CHECK(s.used_bytes <= s.data_bytes);
        CHECK(s.payload_bytes <= s.used_bytes);
        uint64_t present = check_all(c, "e", nkeys);
        CHECK_EQ(present, s.entries);
        /* a reasonably full cache: at least a third of the data area holds payload */
        CHECK(s.payload_bytes * 3 >= s.data_bytes);
        logf_("%-6s %" PRIu64 " sets, %" PRIu64 " live, payload %.0f%% of data area, "
              "%.2fs", pnames[p], nkeys, s.entries,
              100.0 * (double)s.payload_bytes / (double)s.data_bytes, now_s() - t);
        destroy_seg(c, name);
    }
}

/* Deterministic: small values with a value larger than two pages every 10th set, in a
 * segment a tenth of what is written.  Slab classes and page runs compete for pages;
 * every set must still find room. */
static void test_eviction_with_large_values(void) {
    static const uint32_t policies[3] = {SHM_POLICY_LRU, SHM_POLICY_SIEVE, SHM_POLICY_S3FIFO};
    static char v[150000];
    for (int p = 0; p < 3; p++) {
        const char *name;
        shm_config cfg = cfg_of(4 << 20);
        cfg.policy = policies[p];
        shm_cache *c = create_seg(&cfg, &name);
        uint64_t rng = 88172645463325252ULL;
        char k[64];
        for (uint64_t i = 0; i < 8000; i++) {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            uint64_t n = i % 10 == 0 ? sizeof v : 100 + rng % 5900;
            fill_value(v, n, (uint32_t)i);
            uint32_t kl = key_of(k, "wl", i);
            int rc = shm_set(c, k, kl, v, n, 0, 0, SHM_SET, 0, NULL);
            if (rc != SHM_OK)
                fprintf(stderr, "policy %u: set #%" PRIu64 " of %" PRIu64 " bytes: rc %d\n",
                        policies[p], i, n, rc);
            CHECK_EQ(rc, SHM_OK);
        }
        verify_ok(c);
        shm_stats s = stats_of(c);
        CHECK_EQ(s.total.set_failures, 0);
        CHECK_EQ(check_all(c, "wl", 8000), s.entries);
        destroy_seg(c, name);
    }
}

static int large_class(shm_cache *c, uint32_t nclasses, shm_class_stats *out) {
    for (uint32_t i = 0; i < nclasses; i++) {
        CHECK_EQ(shm_class_stats_get(c, i, out), SHM_OK);
        if (out->chunk_bytes == 0) return (int)i;
    }
    return -1;
}

static void test_mixed_sizes(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    shm_config got = config_of(c);
    uint64_t big_hi = got.max_value_len < 300000 ? got.max_value_len : 300000;
    CHECK(big_hi > 2 * (uint64_t)got.page_bytes);
    uint64_t n_small = 0, n_large = 0, n_mid = 0, n_mix = 0;
    shm_class_stats lc;

    churn(c, "small", 24ull << 20, 20, 400, &n_small);       /* all pages to small */
    verify_ok(c);
    shm_stats s = stats_of(c);
    CHECK(s.nclasses >= 2 && s.nclasses <= SHM_MAX_CLASSES);
    CHECK(large_class(c, s.nclasses, &lc) >= 0);
    uint64_t small_entries = s.entries;

    /* now only values larger than a page: page runs, pages taken back from slabs */
    churn(c, "large", 40ull << 20, (uint64_t)got.page_bytes + 1, big_hi, &n_large);
    verify_ok(c);
    s = stats_of(c);
    CHECK(large_class(c, s.nclasses, &lc) >= 0);
    logf_("after large phase: large class %u pages of %" PRIu64 ", %" PRIu64 " entries, "
          "rebalance evictions %" PRIu64, lc.pages, s.pages_total, lc.entries,
          s.total.evictions[SHM_REASON_REBALANCE]);
    CHECK(lc.entries > 0);
    CHECK(lc.pages * 4 >= s.pages_total);            /* memory moved to large values */
    CHECK(s.entries < small_entries);
    CHECK_EQ(s.total.set_failures, 0);

    /* medium values, then everything interleaved */
    churn(c, "mid", 24ull << 20, 2000, 20000, &n_mid);
    verify_ok(c);
    {
        char *v = malloc(big_hi);
        char k[64];
        CHECK(v != NULL);
        for (uint64_t i = 0; i < 3000; i++) {
            uint64_t kind = rnd() % 10, n;
            if (kind < 6) n = rnd_range(8, 500);
            else if (kind < 9) n = rnd_range(500, 30000);
            else n = rnd_range(30000, big_hi);
            fill_value(v, n, (uint32_t)i);
            uint32_t kl = key_of(k, "mix", i);
            CHECK_EQ(shm_set(c, k, kl, v, n, 0, 0, SHM_SET, 0, NULL), SHM_OK);
            if (i % 7 == 0) {
                uint32_t dk = key_of(k, "mix", rnd() % (i + 1));
                int rc = shm_delete(c, k, dk, 0);
                CHECK(rc == SHM_OK || rc == SHM_MISS);
            }
        }
        n_mix = 3000;
        free(v);
    }
    verify_ok(c);
    s = stats_of(c);
    CHECK_EQ(s.total.set_failures, 0);
    uint64_t present = check_all(c, "small", n_small) + check_all(c, "large", n_large) +
                       check_all(c, "mid", n_mid) + check_all(c, "mix", n_mix);
    CHECK_EQ(present, s.entries);
    uint64_t cls_entries = 0, cls_used = 0;
    shm_class_stats cs;
    for (uint32_t i = 0; i < s.nclasses; i++) {
        CHECK_EQ(shm_class_stats_get(c, i, &cs), SHM_OK);
        cls_entries += cs.entries;
        cls_used += cs.used_bytes;
        CHECK(cs.payload_bytes <= cs.used_bytes);
    }
    CHECK(shm_class_stats_get(c, s.nclasses, &cs) < 0);
    CHECK_EQ(cls_entries, s.entries);
    CHECK_EQ(cls_used, s.used_bytes);
    CHECK(s.fragmentation >= 0.0 && s.fragmentation < 1.0);
    logf_("mixed: %" PRIu64 " live entries, fragmentation %.3f, evictions cap=%" PRIu64
          " rebalance=%" PRIu64, s.entries, s.fragmentation,
          s.total.evictions[SHM_REASON_CAPACITY], s.total.evictions[SHM_REASON_REBALANCE]);
    destroy_seg(c, name);
}

static void test_max_entries(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    cfg.max_entries = 200;
    shm_cache *c = create_seg(&cfg, &name);
    char k[64];
    for (uint64_t i = 0; i < 1000; i++) {
        uint32_t kl = key_of(k, "m", i);
        CHECK_EQ(shm_set(c, k, kl, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_OK);
        CHECK(shm_count(c) <= 200);
    }
    shm_stats s = stats_of(c);
    CHECK_EQ(s.max_entries, 200);
    CHECK(s.entries <= 200 && s.entries >= 100);
    CHECK(s.total.evictions[SHM_REASON_ENTRIES] >= 800);
    verify_ok(c);
    destroy_seg(c, name);
}

/* SHM_CFG_VERIFY_READS: bytes damaged inside the segment are dropped, never served. */
static void test_verify_reads(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    cfg.flags = SHM_CFG_VERIFY_READS;
    shm_cache *c = create_seg(&cfg, &name);
    CHECK_EQ(config_of(c).flags, SHM_CFG_VERIFY_READS);
    static char v[3000], big[150000];
    fill_value(v, sizeof v, 7);
    fill_value(big, sizeof big, 8);
    CHECK_EQ(shm_set(c, "good", 4, v, sizeof v, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_set(c, "bad", 3, v, sizeof v, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_set(c, "badbig", 6, big, sizeof big, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(shm_set(c, "badpin", 6, v, sizeof v, 0, 0, SHM_SET, 0, NULL), SHM_OK);

    /* flip one value byte in place, through a pinned pointer into the mapping */
    const char *keys[3] = {"bad", "badbig", "badpin"};
    for (int i = 0; i < 3; i++) {
        const char *p;
        uint64_t l;
        uint32_t id;
        shm_item_info info;
        CHECK_EQ(shm_pin(c, keys[i], (uint32_t)strlen(keys[i]), &p, &l, &info, &id), SHM_OK);
        ((char *)p)[l / 2] ^= 0x5a;
        CHECK_EQ(shm_unpin(c, id), SHM_OK);
    }
    shm_stats s0 = stats_of(c);
    char *got = NULL;
    CHECK_EQ(get_alloc(c, "bad", 3, &got), SHM_MISS);
    free(got);
    CHECK_EQ(get_alloc(c, "badbig", 6, &got), SHM_MISS);
    free(got);
    {
        const char *p;
        uint64_t l;
        uint32_t id;
        shm_item_info info;
        CHECK_EQ(shm_pin(c, "badpin", 6, &p, &l, &info, &id), SHM_MISS);
    }
    CHECK_EQ(get_alloc(c, "good", 4, &got), (int64_t)sizeof v);
    CHECK(value_ok(got, sizeof v, NULL));
    free(got);
    shm_stats s1 = stats_of(c);
    CHECK_EQ(s1.total.corrupt_dropped - s0.total.corrupt_dropped, 3);
    CHECK_EQ(s1.entries, 1);
    CHECK_EQ(shm_contains(c, "bad", 3), 0);
    verify_ok(c);
    /* the memory is reusable */
    CHECK_EQ(shm_set(c, "bad", 3, v, sizeof v, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    CHECK_EQ(get_alloc(c, "bad", 3, &got), (int64_t)sizeof v);
    free(got);
    verify_ok(c);
    destroy_seg(c, name);
}

typedef struct { uint32_t op; char key[64]; uint32_t klen; uint64_t version; int64_t exp; } jrec;

static int drain_all(shm_cache *c, jrec *out, int max, uint64_t cap) {
    char *buf = malloc(cap);
    CHECK(buf != NULL);
    int n = 0;
    for (;;) {
        int64_t got = shm_journal_drain(c, buf, cap);
        CHECK(got >= 0);
        CHECK((uint64_t)got <= cap);
        if (got == 0) break;
        CHECK_EQ(got % 8, 0);
        uint64_t pos = 0;
        while (pos < (uint64_t)got) {
            shm_journal_record r;
            CHECK(pos + sizeof r <= (uint64_t)got);
            memcpy(&r, buf + pos, sizeof r);
            CHECK(pos + sizeof r + r.key_len <= (uint64_t)got);
            CHECK(r.op >= SHM_JOP_SET && r.op <= SHM_JOP_CLEAR);
            if (n < max) {
                out[n].op = r.op;
                out[n].klen = r.key_len;
                out[n].version = r.version;
                out[n].exp = r.expires_at_ms;
                memset(out[n].key, 0, sizeof out[n].key);
                memcpy(out[n].key, buf + pos + sizeof r,
                       r.key_len < sizeof out[n].key - 1 ? r.key_len : sizeof out[n].key - 1);
            }
            n++;
            pos += (sizeof r + r.key_len + 7) & ~(uint64_t)7;
        }
        CHECK_EQ(pos, (uint64_t)got);
    }
    free(buf);
    return n;
}

static void test_journal(void) {
    const char *name;
    /* no journal: drain gives nothing */
    shm_config cfg0 = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg0, &name);
    CHECK_EQ(set_simple(c, "x", "y"), SHM_OK);
    char tiny[64];
    CHECK_EQ(shm_journal_drain(c, tiny, sizeof tiny), 0);
    CHECK_EQ(stats_of(c).journal_bytes, 0);
    destroy_seg(c, name);

    shm_config cfg = cfg_of(8 << 20);
    cfg.journal_bytes = 64 << 10;
    c = create_seg(&cfg, &name);
    CHECK_EQ(config_of(c).journal_bytes, 64 << 10);
    uint64_t va = 0, vb = 0;
    int64_t r;
    CHECK_EQ(shm_set(c, "a", 1, "1", 1, 0, 0, SHM_SET, 0, &va), SHM_OK);
    CHECK_EQ(shm_set(c, "bee", 3, "2", 1, 60000, 0, SHM_SET, 0, &vb), SHM_OK);
    CHECK_EQ(shm_touch(c, "bee", 3, 120000), SHM_OK);
    CHECK_EQ(shm_delete(c, "a", 1, 0), SHM_OK);
    CHECK_EQ(shm_delete(c, "a", 1, 0), SHM_MISS);            /* no record: nothing done */
    CHECK_EQ(shm_incr(c, "cnt", 3, 1, 1, 0, 0, &r), SHM_OK);
    CHECK_EQ(shm_clear(c), SHM_OK);
    shm_stats s = stats_of(c);
    CHECK_EQ(s.journal_bytes, 64 << 10);
    CHECK(s.journal_used > 0);
    NOTE(s.journal_records == 6, "journal_records %" PRIu64 " after 6 journaled writes",
         s.journal_records);
    CHECK_EQ(s.journal_dropped, 0);

    jrec recs[16];
    int n = drain_all(c, recs, 16, 4096);
    CHECK_EQ(n, 6);
    CHECK_EQ(recs[0].op, SHM_JOP_SET);
    CHECK(recs[0].klen == 1 && strcmp(recs[0].key, "a") == 0);
    CHECK_EQ(recs[0].version, va);
    CHECK_EQ(recs[0].exp, 0);
    CHECK_EQ(recs[1].op, SHM_JOP_SET);
    CHECK(strcmp(recs[1].key, "bee") == 0);
    CHECK_EQ(recs[1].version, vb);
    CHECK(recs[1].exp > 0);
    CHECK_EQ(recs[2].op, SHM_JOP_TOUCH);
    CHECK(strcmp(recs[2].key, "bee") == 0);
    CHECK(recs[2].version > vb);
    CHECK(recs[2].exp > recs[1].exp);
    CHECK_EQ(recs[3].op, SHM_JOP_DELETE);
    CHECK(strcmp(recs[3].key, "a") == 0);
    CHECK_EQ(recs[4].op, SHM_JOP_SET);                        /* incr writes the value */
    CHECK(strcmp(recs[4].key, "cnt") == 0);
    CHECK_EQ(recs[5].op, SHM_JOP_CLEAR);
    CHECK_EQ(shm_journal_drain(c, tiny, sizeof tiny), 0);     /* drained */
    s = stats_of(c);
    CHECK_EQ(s.journal_used, 0);

    /* overflow: writes keep working, the journal counts what it dropped */
    char k[64];
    for (uint64_t i = 0; i < 10000; i++) {
        uint32_t kl = key_of(k, "journal-overflow", i);
        CHECK_EQ(shm_set(c, k, kl, "v", 1, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    }
    s = stats_of(c);
    CHECK(s.journal_dropped > 0);
    CHECK(s.journal_used <= s.journal_bytes);
    static jrec big[10000];
    n = drain_all(c, big, 10000, 1000);                       /* small drains */
    CHECK(n > 100);
    NOTE((uint64_t)n + s.journal_dropped == 10000,
         "drained %d + dropped %" PRIu64 " != 10000 records written", n, s.journal_dropped);
    /* records come out in write order */
    unsigned long prev = 0;
    for (int i = 0; i < n; i++) {
        unsigned long idx;
        CHECK_EQ(sscanf(big[i].key, "journal-overflow:%lu", &idx), 1);
        if (i) CHECK(idx > prev);
        prev = idx;
        CHECK_EQ(big[i].op, SHM_JOP_SET);
    }
    /* after draining there is room again */
    CHECK_EQ(set_simple(c, "later", "v"), SHM_OK);
    n = drain_all(c, recs, 16, 4096);
    CHECK_EQ(n, 1);
    CHECK(strcmp(recs[0].key, "later") == 0);
    verify_ok(c);
    destroy_seg(c, name);
}

static void test_fork(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    int parent_slot = shm_my_slot(c);
    CHECK(parent_slot >= 0);
    CHECK_EQ(set_simple(c, "from-parent", "p"), SHM_OK);

    const char *pp;
    uint64_t pl;
    uint32_t parent_pin;
    shm_item_info pinfo;
    CHECK_EQ(shm_pin(c, "from-parent", 11, &pp, &pl, &pinfo, &parent_pin), SHM_OK);

    /* 1: the child writes through the inherited handle and closes it */
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        g_depth = 2;
        int s = shm_my_slot(c);
        CHECK(s >= 0 && s != parent_slot);                   /* its own slot */
        shm_slot_stats ss;
        CHECK_EQ(shm_slot_stats_get(c, (uint32_t)s, &ss), SHM_OK);
        CHECK_EQ(ss.pid, getpid());
        expect_value(c, "from-parent", "p");
        CHECK_EQ(shm_unpin(c, parent_pin), SHM_EINVAL);    /* not the child's pin */
        char k[64], v[64];
        for (uint64_t i = 0; i < 1000; i++) {
            uint32_t kl = key_of(k, "child", i);
            int vl = snprintf(v, sizeof v, "value-%" PRIu64, i * 3);
            CHECK_EQ(shm_set(c, k, kl, v, (uint64_t)vl, 0, 0, SHM_SET, 0, NULL), SHM_OK);
        }
        shm_close(c);
        _exit(0);
    }
    int st = 0;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    char k[64], v[64], buf[64];
    for (uint64_t i = 0; i < 1000; i++) {
        uint32_t kl = key_of(k, "child", i);
        int vl = snprintf(v, sizeof v, "value-%" PRIu64, i * 3);
        CHECK_EQ(shm_get(c, k, kl, buf, sizeof buf, NULL), vl);
        CHECK(memcmp(buf, v, (size_t)vl) == 0);
    }
    CHECK_EQ(shm_my_slot(c), parent_slot);                   /* parent unchanged */
    shm_slot_stats pss;
    CHECK_EQ(shm_slot_stats_get(c, (uint32_t)parent_slot, &pss), SHM_OK);
    CHECK_EQ(pss.pins, 1);                                   /* still the parent's */
    CHECK_EQ(shm_unpin(c, parent_pin), SHM_OK);
    shm_stats s = stats_of(c);
    CHECK(s.total.sets >= 1001);                              /* child's counters kept */
    CHECK_EQ(s.live_slots, 1);

    /* 2: a child that exits without closing leaves a dead slot for reap */
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        g_depth = 2;
        CHECK_EQ(set_simple(c, "child2", "c2"), SHM_OK);
        _exit(0);
    }
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    expect_value(c, "child2", "c2");
    CHECK_EQ(shm_reap(c), 1);
    CHECK_EQ(shm_reap(c), 0);
    s = stats_of(c);
    CHECK_EQ(s.live_slots, 1);
    CHECK(s.total.sets >= 1002);
    verify_ok(c);

    /* 3: a child attaches by name on its own (a fresh handle, another mapping) */
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        g_depth = 2;
        shm_cache *mine = attach_seg(name);
        expect_value(mine, "child2", "c2");
        CHECK_EQ(set_simple(mine, "child3", "c3"), SHM_OK);
        shm_close(mine);
        shm_close(c);
        _exit(0);
    }
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    expect_value(c, "child3", "c3");
    CHECK_EQ(shm_reap(c), 0);
    verify_ok(c);
    destroy_seg(c, name);
}

/* The child of the kill loop: writes self-checking values, pins, deletes, counts,
 * until SIGKILL arrives. */
static void killed_child(shm_cache *c, uint32_t seed) {
    g_depth = 2;
    g_rng ^= (uint64_t)seed * 0x9E3779B97F4A7C15ULL;
    static char v[120000];
    char k[64];
    int held = 0;
    for (uint64_t it = 0;; it++) {
        uint64_t idx = rnd() % 400;
        uint32_t kl = key_of(k, "kill", idx);
        uint64_t op = rnd() % 20, n;
        if (op < 12) {
            n = (op == 0) ? rnd_range(70000, sizeof v) : rnd_range(8, 3000);
            fill_value(v, n, (uint32_t)rnd());
            int rc = shm_set(c, k, kl, v, n, 0, 0, SHM_SET, 0, NULL);
            if (rc != SHM_OK) _exit(10);
        } else if (op < 15) {
            int64_t g = shm_get(c, k, kl, v, sizeof v, NULL);
            if (g >= 0 && !value_ok(v, (uint64_t)g, NULL)) _exit(11);
            if (g < 0 && g != SHM_MISS) _exit(12);
        } else if (op < 17) {
            const char *p;
            uint64_t l;
            uint32_t id;
            shm_item_info info;
            int rc = shm_pin(c, k, kl, &p, &l, &info, &id);
            if (rc == SHM_OK) {
                if (!value_ok(p, l, NULL)) _exit(13);
                if (held < 4 && rnd() % 8 == 0) held++;           /* a few stay pinned */
                else if (shm_unpin(c, id) != SHM_OK) _exit(14);
            } else if (rc != SHM_MISS) {
                _exit(17);
            }
        } else if (op < 19) {
            int rc = shm_delete(c, k, kl, 0);
            if (rc != SHM_OK && rc != SHM_MISS) _exit(15);
        } else {
            int64_t r;
            int rc = shm_incr(c, "kill-counter", 12, 1, 1, 0, 0, &r);
            if (rc != SHM_OK) _exit(16);
        }
    }
}

static void test_kill_loop(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    cfg.journal_bytes = 16 << 10;
    shm_cache *c = create_seg(&cfg, &name);
    int killed = 0, exited_early = 0;
    double t = now_s();
    for (int round = 0; round < 60; round++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) killed_child(c, (uint32_t)round + 1);
        usleep((useconds_t)rnd_range(2000, 40000));
        int st = 0;
        pid_t w = waitpid(pid, &st, WNOHANG);
        CHECK(w == 0 || w == pid);
        if (w == pid) {
            fprintf(stderr, "kill-loop child %d ended by itself: status %d\n", round, st);
            exited_early++;
            continue;
        }
        CHECK_EQ(kill(pid, SIGKILL), 0);
        CHECK_EQ(waitpid(pid, &st, 0), pid);
        CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        killed++;
        /* the parent keeps working between kills (it may have to repair a lock) */
        char k[64];
        uint32_t kl = key_of(k, "parent", (uint64_t)round);
        char v[100];
        fill_value(v, sizeof v, (uint32_t)round);
        CHECK_EQ(shm_set(c, k, kl, v, sizeof v, 0, 0, SHM_SET, 0, NULL), SHM_OK);
    }
    CHECK_EQ(exited_early, 0);
    int reaped = shm_reap(c);
    CHECK(reaped >= 1);
    CHECK(reaped <= killed);
    CHECK_EQ(shm_reap(c), 0);
    verify_ok(c);
    shm_stats s = stats_of(c);
    CHECK_EQ(s.live_slots, 1);
    for (uint32_t i = 0; i < s.max_slots; i++) {
        shm_slot_stats ss;
        CHECK_EQ(shm_slot_stats_get(c, i, &ss), SHM_OK);
        if (ss.state == 1) CHECK_EQ(ss.pid, getpid());
        CHECK(ss.state != 2);                                   /* nothing left dead */
        if (ss.state == 1) CHECK_EQ(ss.pins, 0);
    }
    CHECK(shm_slot_stats_get(c, s.max_slots, &(shm_slot_stats){0}) < 0);
    /* nothing torn: every value present checks out */
    uint64_t present = check_all(c, "kill", 400) + check_all(c, "parent", 60);
    int64_t r = 0;
    int rc = shm_incr(c, "kill-counter", 12, 0, 0, 0, 0, &r);
    CHECK(rc == SHM_OK || rc == SHM_MISS);
    if (rc == SHM_OK) {
        present++;
        CHECK(r >= 0);
    }
    CHECK_EQ(present, s.entries);
    CHECK_EQ((int64_t)present, shm_count(c));
    /* and it still takes a full churn */
    churn(c, "post", 16ull << 20, 16, 5000, NULL);
    verify_ok(c);
    logf_("%d children killed, %d slots reaped, %" PRIu64 " lock repairs, %" PRIu64
          " entries intact, %.2fs", killed, reaped, s.total.lock_repairs, present,
          now_s() - t);
    destroy_seg(c, name);
}

static void fill_random(int fd, uint64_t size) {
    CHECK_EQ(ftruncate(fd, (off_t)size), 0);
    if (size == 0) return;
    unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(p != MAP_FAILED);
    for (uint64_t i = 0; i < size; i++) p[i] = (unsigned char)rnd();
    CHECK_EQ(munmap(p, size), 0);
}

static int attach_fd(int fd, uint32_t wait_ms) {
    shm_cache *c = NULL;
    int rc = shm_attach(fd, wait_ms, &c);
    CHECK(rc < 0);                                    /* never OK on these objects */
    CHECK(c == NULL);
    CHECK(strlen(shm_last_error()) > 0);
    return rc;
}

static void test_attach_garbage(void) {
    const char *name;
    int fd, rc;

    /* random bytes, a plausible size */
    fd = new_object(&name);
    fill_random(fd, 4 << 20);
    rc = attach_fd(fd, 100);
    if (rc != SHM_EFOREIGN && rc != SHM_ECORRUPT) fprintf(stderr, "garbage: rc %d\n", rc);
    CHECK(rc == SHM_EFOREIGN || rc == SHM_ECORRUPT);
    CHECK_EQ(close(fd), 0);
    CHECK_EQ(shm_unlink(name), 0);
    forget_name(name);

    /* too small to hold a header: random 100 bytes, then empty */
    fd = new_object(&name);
    fill_random(fd, 100);
    rc = attach_fd(fd, 100);
    if (rc != SHM_EFOREIGN && rc != SHM_ECORRUPT && rc != SHM_ENOTREADY)
        fprintf(stderr, "tiny: rc %d\n", rc);
    CHECK(rc == SHM_EFOREIGN || rc == SHM_ECORRUPT || rc == SHM_ENOTREADY);
    CHECK_EQ(ftruncate(fd, 0), 0);
    double t = now_s();
    rc = attach_fd(fd, 200);                 /* a creator that never sized it */
    CHECK(rc == SHM_ENOTREADY || rc == SHM_EFOREIGN || rc == SHM_ECORRUPT);
    CHECK(now_s() - t < 5.0);                /* wait_ms is honoured */
    CHECK_EQ(close(fd), 0);
    CHECK_EQ(shm_unlink(name), 0);
    forget_name(name);

    /* all zeros: a creator that sized it but never initialised it */
    fd = new_object(&name);
    CHECK_EQ(ftruncate(fd, 4 << 20), 0);
    t = now_s();
    rc = attach_fd(fd, 200);
    CHECK(rc == SHM_ENOTREADY || rc == SHM_EFOREIGN || rc == SHM_ECORRUPT);
    CHECK(now_s() - t < 5.0);
    CHECK_EQ(close(fd), 0);
    CHECK_EQ(shm_unlink(name), 0);
    forget_name(name);

    /* a real segment's first 64 KiB copied into an object that is too small */
    const char *real;
    shm_config cfg = cfg_of(4 << 20);
    shm_cache *c = create_seg(&cfg, &real);
    CHECK_EQ(set_simple(c, "k", "v"), SHM_OK);
    int rfd = shm_open(real, O_RDWR, 0);
    CHECK(rfd >= 0);
    unsigned char *src = mmap(NULL, 4 << 20, PROT_READ, MAP_SHARED, rfd, 0);
    CHECK(src != MAP_FAILED);
    fd = new_object(&name);
    CHECK_EQ(ftruncate(fd, 64 << 10), 0);
    unsigned char *dst = mmap(NULL, 64 << 10, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(dst != MAP_FAILED);
    memcpy(dst, src, 64 << 10);
    CHECK_EQ(munmap(dst, 64 << 10), 0);
    rc = attach_fd(fd, 100);
    if (rc != SHM_ECORRUPT && rc != SHM_EFOREIGN && rc != SHM_EINCOMPAT)
        fprintf(stderr, "truncated copy: rc %d\n", rc);
    CHECK(rc == SHM_ECORRUPT || rc == SHM_EFOREIGN || rc == SHM_EINCOMPAT);
    CHECK_EQ(close(fd), 0);
    CHECK_EQ(shm_unlink(name), 0);
    forget_name(name);

    /* a full copy with a damaged header word (size field region): refused */
    fd = new_object(&name);
    CHECK_EQ(ftruncate(fd, 4 << 20), 0);
    dst = mmap(NULL, 4 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(dst != MAP_FAILED);
    memcpy(dst, src, 4 << 20);
    dst[24] ^= 0x40;                         /* inside the immutable, checksummed part */
    CHECK_EQ(munmap(dst, 4 << 20), 0);
    rc = attach_fd(fd, 100);
    CHECK(rc == SHM_ECORRUPT || rc == SHM_EFOREIGN || rc == SHM_EINCOMPAT);
    CHECK_EQ(close(fd), 0);
    CHECK_EQ(shm_unlink(name), 0);
    forget_name(name);
    CHECK_EQ(munmap(src, 4 << 20), 0);

    /* permissions wider than owner-only: not ours to use */
    CHECK_EQ(fchmod(rfd, 0644), 0);
    rc = attach_fd(rfd, 100);
    CHECK_EQ(rc, SHM_EFOREIGN);
    CHECK_EQ(fchmod(rfd, 0600), 0);
    shm_cache *again = NULL;
    CHECK_EQ(shm_attach(rfd, 100, &again), SHM_OK);          /* fine once fixed */
    expect_value(again, "k", "v");
    shm_close(again);
    CHECK_EQ(close(rfd), 0);
    /* the real segment is untouched by all of this */
    expect_value(c, "k", "v");
    verify_ok(c);
    destroy_seg(c, real);
}

typedef struct { shm_cache *c; uint32_t seed; int err; } thr_arg;

static void *thr_main(void *p) {
    thr_arg *a = p;
    uint64_t rng = a->seed * 0x9E3779B97F4A7C15ULL + 1;
    char v[4096], k[64];
    for (int i = 0; i < 20000 && !a->err; i++) {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        uint64_t idx = rng % 300;
        uint32_t kl = key_of(k, "thr", idx);
        int op = (int)((rng >> 20) % 10);
        if (op < 4) {
            uint64_t n = 8 + (rng >> 32) % (sizeof v - 8);
            fill_value(v, n, (uint32_t)(rng >> 8));
            if (shm_set(a->c, k, kl, v, n, 0, 0, SHM_SET, 0, NULL) != SHM_OK) a->err = 1;
        } else if (op < 8) {
            int64_t g = shm_get(a->c, k, kl, v, sizeof v, NULL);
            if (g >= 0 && !value_ok(v, (uint64_t)g, NULL)) a->err = 2;
            if (g < 0 && g != SHM_MISS) a->err = 3;
        } else if (op < 9) {
            int rc = shm_delete(a->c, k, kl, 0);
            if (rc != SHM_OK && rc != SHM_MISS) a->err = 4;
        } else {
            int64_t r;
            if (shm_incr(a->c, "thr-counter", 11, 1, 1, 0, 0, &r) != SHM_OK) a->err = 5;
        }
    }
    return NULL;
}

static void test_threads(void) {
    const char *name;
    shm_config cfg = cfg_of(4 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    enum { T = 4 };
    pthread_t th[T];
    thr_arg args[T];
    for (int i = 0; i < T; i++) {
        args[i] = (thr_arg){c, (uint32_t)i + 1, 0};
        CHECK_EQ(pthread_create(&th[i], NULL, thr_main, &args[i]), 0);
    }
    for (int i = 0; i < T; i++) CHECK_EQ(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < T; i++) CHECK_EQ(args[i].err, 0);
    char buf[32];
    int64_t n = shm_get(c, "thr-counter", 11, buf, sizeof buf - 1, NULL);
    CHECK(n > 0);
    buf[n] = 0;
    shm_stats s = stats_of(c);
    long long counter = atoll(buf);
    CHECK_EQ(counter, (long long)s.total.incrs);     /* no lost increments */
    check_all(c, "thr", 300);
    verify_ok(c);
    destroy_seg(c, name);
}

static void test_stats(void) {
    const char *name;
    shm_config cfg = cfg_of(8 << 20);
    shm_cache *c = create_seg(&cfg, &name);
    shm_stats s = stats_of(c);
    CHECK_EQ(s.size_bytes, 8 << 20);
    CHECK(s.data_bytes > 0 && s.data_bytes < s.size_bytes);
    CHECK(s.index_buckets > 0);
    CHECK_EQ(s.entries, 0);
    CHECK_EQ(s.used_bytes, 0);
    CHECK_EQ(s.page_bytes, 65536);
    CHECK_EQ(s.pages_total * s.page_bytes <= s.data_bytes, 1);
    NOTE(s.pages_free == s.pages_total, "fresh segment: %" PRIu64 " of %" PRIu64
         " pages free", s.pages_free, s.pages_total);
    CHECK_EQ(s.max_slots, 256);
    CHECK_EQ(s.live_slots, 1);
    CHECK_EQ(s.max_key_len, 250);
    CHECK(s.nclasses >= 2 && s.nclasses <= SHM_MAX_CLASSES);
    CHECK_EQ(s.total.hits + s.total.misses + s.total.sets, 0);

    CHECK_EQ(set_simple(c, "a", "1"), SHM_OK);
    CHECK_EQ(set_simple(c, "b", "2"), SHM_OK);
    expect_value(c, "a", "1");
    expect_value(c, "a", "1");
    expect_value(c, "b", "2");
    expect_miss(c, "c");
    expect_miss(c, "d");
    s = stats_of(c);
    CHECK_EQ(s.total.hits, 3);
    CHECK_EQ(s.total.misses, 2);
    CHECK_EQ(s.total.sets, 2);
    CHECK_EQ(s.entries, 2);
    CHECK(s.used_bytes > 0);
    CHECK(s.payload_bytes > 0 && s.payload_bytes <= s.used_bytes);
    CHECK(s.pages_free < s.pages_total);

    int my = shm_my_slot(c);
    CHECK(my >= 0 && (uint32_t)my < s.max_slots);
    shm_slot_stats ss;
    CHECK_EQ(shm_slot_stats_get(c, (uint32_t)my, &ss), SHM_OK);
    CHECK_EQ(ss.pid, getpid());
    CHECK_EQ(ss.state, 1);
    CHECK_EQ(ss.counters.hits, 3);
    CHECK_EQ(ss.counters.misses, 2);
    CHECK(ss.attached_at_ms > 0);
    CHECK(shm_slot_stats_get(c, s.max_slots, &ss) < 0);

    shm_class_stats cs;
    uint64_t entries = 0;
    for (uint32_t i = 0; i < s.nclasses; i++) {
        CHECK_EQ(shm_class_stats_get(c, i, &cs), SHM_OK);
        entries += cs.entries;
        if (i > 0 && cs.chunk_bytes) CHECK(cs.chunk_bytes > 0);
    }
    CHECK_EQ(entries, 2);
    CHECK(shm_class_stats_get(c, s.nclasses, &cs) < 0);

    /* a second handle counts as a live slot; its counters add up in the total */
    shm_cache *b = attach_seg(name);
    expect_value(b, "b", "2");
    s = stats_of(c);
    CHECK_EQ(s.total.hits, 4);
    NOTE(s.live_slots == 2, "live_slots with two handles in one process: %u", s.live_slots);
    shm_close(b);
    s = stats_of(c);
    CHECK_EQ(s.total.hits, 4);                       /* closed slot's counters retired */
    CHECK_EQ(s.live_slots, 1);

    /* metadata reads: counted consistently (both or neither) */
    shm_item_info info;
    CHECK_EQ(shm_info(c, "a", 1, &info), SHM_OK);
    CHECK_EQ(shm_info(c, "zz", 2, &info), SHM_MISS);
    shm_stats s2 = stats_of(c);
    NOTE(s2.total.hits - s.total.hits == s2.total.misses - s.total.misses,
         "shm_info counted %" PRIu64 " hit(s) and %" PRIu64 " miss(es) for one of each",
         s2.total.hits - s.total.hits, s2.total.misses - s.total.misses);
    destroy_seg(c, name);
}

/* ---- runner ---------------------------------------------------------------------------- */

typedef struct { const char *name; void (*fn)(void); } test_case;
static const test_case TESTS[] = {
    {"misc", test_misc},
    {"create_attach", test_create_attach},
    {"basic_ops", test_basic_ops},
    {"incr", test_incr},
    {"contains_count_clear", test_contains_count_clear},
    {"ttl", test_ttl},
    {"sweep_expired", test_sweep_expired},
    {"pin", test_pin},
    {"keys", test_keys},
    {"limits", test_limits},
    {"stats", test_stats},
    {"eviction_fill", test_eviction_fill},
    {"eviction_with_large_values", test_eviction_with_large_values},
    {"mixed_sizes", test_mixed_sizes},
    {"max_entries", test_max_entries},
    {"verify_reads", test_verify_reads},
    {"journal", test_journal},
    {"fork", test_fork},
    {"threads", test_threads},
    {"kill_loop", test_kill_loop},
    {"attach_garbage", test_attach_garbage},
};
#define NTESTS ((int)(sizeof TESTS / sizeof TESTS[0]))

static int run_one(const test_case *t, int no_fork) {
    double t0 = now_s();
    printf("--- %s\n", t->name);
    fflush(stdout);
    if (no_fork) {
        g_depth = 1;
        t->fn();
        unlink_all();
        printf("ok   %s (%.2fs, %ld checks)\n", t->name, now_s() - t0, g_checks);
        return 1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 0;
    }
    if (pid == 0) {
        g_depth = 1;
        alarm(120);                          /* a deadlock becomes a failure */
        t->fn();
        unlink_all();
        printf("ok   %s (%.2fs, %ld checks)\n", t->name, now_s() - t0, g_checks);
        fflush(stdout);
        exit(0);                             /* LeakSanitizer runs here */
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return 1;
    if (WIFSIGNALED(st))
        printf("FAIL %s: killed by signal %d%s (%.2fs)\n", t->name, WTERMSIG(st),
               WTERMSIG(st) == SIGALRM ? " (timeout: deadlock?)" : "", now_s() - t0);
    else
        printf("FAIL %s: exit status %d (%.2fs)\n", t->name, WEXITSTATUS(st), now_s() - t0);
    /* the test's segments carry its pid; unlink whatever it left behind */
    for (int i = 0; i < 32; i++) {
        char n[64];
        snprintf(n, sizeof n, "/shmcache-ctest-%d-%d", (int)pid, i);
        shm_unlink(n);
    }
    return 0;
}

int main(int argc, char **argv) {
    int no_fork = 0;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-fork") == 0) no_fork = 1;
        else if (strcmp(argv[i], "--list") == 0) {
            for (int j = 0; j < NTESTS; j++) printf("%s\n", TESTS[j].name);
            return 0;
        } else only = argv[i];
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    g_rng ^= (uint64_t)getpid() << 17;
    double t0 = now_s();
    int passed = 0, failed = 0;
    for (int i = 0; i < NTESTS; i++) {
        if (only && strcmp(only, TESTS[i].name) != 0) continue;
        if (run_one(&TESTS[i], no_fork)) passed++;
        else failed++;
    }
    if (passed + failed == 0) {
        fprintf(stderr, "no test named %s (see --list)\n", only ? only : "?");
        return 2;
    }
    printf("engine tests took %.1fs\n", now_s() - t0);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
