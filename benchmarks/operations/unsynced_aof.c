/* LD_PRELOAD shim for redis-server: a host crash, emulated (benchmarks/operations/redis_durability.py).
 *
 * Bytes written to an append-only file (a path containing ".aof") are kept in this process's
 * memory until Redis calls fsync / fdatasync on that file, and only then written and synced.
 * Killing the process (kill -9) therefore loses exactly what a power loss or kernel crash could
 * lose: everything Redis wrote to the AOF but had not yet fsynced (with `appendfsync everysec`,
 * up to about a second or two; with `always`, nothing it has acknowledged). A kill -9 without the
 * shim loses nothing in either mode: written bytes are in the page cache, which survives the
 * process. close() writes what is pending (no sync): an AOF rewrite, rare in a short run.
 *
 *   cc -shared -fPIC -O2 -o unsynced_aof.so unsynced_aof.c -ldl
 *   LD_PRELOAD=$PWD/unsynced_aof.so redis-server --appendonly yes ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FD 65536

struct pending { char *buf; size_t len, cap; int tracked; };
static struct pending files[MAX_FD];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_close)(int);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);

static void init(void) {
    if (real_write) return;
    real_write = dlsym(RTLD_NEXT, "write");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_close = dlsym(RTLD_NEXT, "close");
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
}

static void track(int fd, const char *path) {
    if (fd < 0 || fd >= MAX_FD || !path || !strstr(path, ".aof")) return;
    pthread_mutex_lock(&lock);
    files[fd].tracked = 1;
    files[fd].len = 0;
    pthread_mutex_unlock(&lock);
}

/* write what is pending for fd (the lock held) */
static int drain(int fd) {
    struct pending *p = &files[fd];
    size_t off = 0;
    while (off < p->len) {
        ssize_t n = real_write(fd, p->buf + off, p->len - off);
        if (n < 0) return -1;
        off += (size_t)n;
    }
    p->len = 0;
    return 0;
}

#define OPEN_MODE(flags, mode) \
    mode_t mode = 0; \
    if ((flags) & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); }

int open(const char *path, int flags, ...) {
    init();
    OPEN_MODE(flags, mode);
    int fd = real_open(path, flags, mode);
    track(fd, path);
    return fd;
}

int open64(const char *path, int flags, ...) {
    init();
    OPEN_MODE(flags, mode);
    int fd = real_open64(path, flags, mode);
    track(fd, path);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    init();
    OPEN_MODE(flags, mode);
    int fd = real_openat(dirfd, path, flags, mode);
    track(fd, path);
    return fd;
}

ssize_t write(int fd, const void *buf, size_t count) {
    init();
    if (fd >= 0 && fd < MAX_FD && files[fd].tracked) {
        pthread_mutex_lock(&lock);
        struct pending *p = &files[fd];
        if (p->len + count > p->cap) {
            size_t cap = p->cap ? p->cap : 1 << 16;
            while (cap < p->len + count) cap *= 2;
            p->buf = realloc(p->buf, cap);
            p->cap = cap;
        }
        memcpy(p->buf + p->len, buf, count);
        p->len += count;
        pthread_mutex_unlock(&lock);
        return (ssize_t)count;
    }
    return real_write(fd, buf, count);
}

static int sync_with(int fd, int (*real)(int)) {
    init();
    if (fd >= 0 && fd < MAX_FD && files[fd].tracked) {
        pthread_mutex_lock(&lock);
        int rc = drain(fd);
        pthread_mutex_unlock(&lock);
        if (rc < 0) return -1;
    }
    return real(fd);
}

int fsync(int fd) { init(); return sync_with(fd, real_fsync); }
int fdatasync(int fd) { init(); return sync_with(fd, real_fdatasync); }

int close(int fd) {
    init();
    if (fd >= 0 && fd < MAX_FD && files[fd].tracked) {
        pthread_mutex_lock(&lock);
        drain(fd);
        files[fd].tracked = 0;
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}
