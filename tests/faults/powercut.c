/* A power cut for tests: keeps, for every file under $POWERCUT_WATCH, a copy of its
 * content as of its last successful fsync()/fdatasync() in $POWERCUT_SNAPSHOT.
 *
 * Preloaded into the agent (LD_PRELOAD), it sees SQLite's and Python's syncs alike.
 * After `kill -9`, replacing the watched files by their snapshots gives the files as a
 * disk holds them after a power cut: everything written but not synced is gone (the
 * worst case; a real disk may keep some of it). A rename within the watched folder
 * (an atomic replace: write, fsync, rename) moves the snapshot with it, and an unlink
 * removes it: directory changes count as durable at once.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static const char *watched(const char *path) {
    const char *watch = getenv("POWERCUT_WATCH");
    size_t n = watch ? strlen(watch) : 0;
    if (!n || strncmp(path, watch, n) != 0 || path[n] != '/') return NULL;
    const char *base = strrchr(path, '/');
    return base ? base + 1 : NULL;
}

static void snapshot_path(const char *base, char *out, size_t size) {
    snprintf(out, size, "%s/%s", getenv("POWERCUT_SNAPSHOT"), base);
}

static void snapshot(int fd) {
    struct stat st;
    char link[64], path[PATH_MAX], target[PATH_MAX], tmp[PATH_MAX];
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || !getenv("POWERCUT_SNAPSHOT")) return;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len <= 0) return;
    path[len] = '\0';
    const char *base = watched(path);
    if (!base) return;
    snapshot_path(base, target, sizeof target);
    snprintf(tmp, sizeof tmp, "%s.partial", target);
    int in = open(path, O_RDONLY);  /* fd itself may be write-only */
    if (in < 0) return;
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (out < 0) {
        close(in);
        return;
    }
    char buf[1 << 16];
    ssize_t got;
    while ((got = read(in, buf, sizeof buf)) > 0) {
        if (write(out, buf, (size_t)got) != got) break;
    }
    close(in);
    close(out);
    rename(tmp, target);
}

static int after_sync(int fd, int result) {
    if (result == 0) {
        pthread_mutex_lock(&lock);
        snapshot(fd);
        pthread_mutex_unlock(&lock);
    }
    return result;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return after_sync(fd, real(fd));
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return after_sync(fd, real(fd));
}

int rename(const char *from, const char *to) {
    static int (*real)(const char *, const char *);
    if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    int result = real(from, to);
    const char *from_base = watched(from), *to_base = watched(to);
    if (result == 0 && from_base && to_base && getenv("POWERCUT_SNAPSHOT")) {
        char a[PATH_MAX], b[PATH_MAX];
        snapshot_path(from_base, a, sizeof a);
        snapshot_path(to_base, b, sizeof b);
        pthread_mutex_lock(&lock);
        real(a, b);
        pthread_mutex_unlock(&lock);
    }
    return result;
}

int unlink(const char *path) {
    static int (*real)(const char *);
    if (!real) real = (int (*)(const char *))dlsym(RTLD_NEXT, "unlink");
    int result = real(path);
    const char *base = watched(path);
    if (result == 0 && base && getenv("POWERCUT_SNAPSHOT")) {
        char kept[PATH_MAX];
        snapshot_path(base, kept, sizeof kept);
        pthread_mutex_lock(&lock);
        real(kept);
        pthread_mutex_unlock(&lock);
    }
    return result;
}
