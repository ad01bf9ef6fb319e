/*
 * Fault injection for tests/protocol.rs: preloaded into the agent
 * (LD_PRELOAD), it fails every Nth write of 1 KiB or more to a socket with
 * ENOMEM, as the kernel of a small VM does when it cannot allocate a vsock
 * packet. N comes from RESTORE_AGENT_FAULT_ENOMEM_EVERY (unset or 0: off).
 * Nothing is written by a failed call, as with the real error.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

static atomic_ulong eligible_calls;

static int should_fail(int fd, size_t len)
{
    static atomic_long every_setting = -1;
    long every = atomic_load(&every_setting);
    struct stat st;

    if (every < 0) {
        const char *s = getenv("RESTORE_AGENT_FAULT_ENOMEM_EVERY");
        every = s ? strtol(s, NULL, 10) : 0;
        atomic_store(&every_setting, every);
    }
    if (every <= 0 || len < 1024 || fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode))
        return 0;
    if (atomic_fetch_add(&eligible_calls, 1) % (unsigned long)every != (unsigned long)every - 1)
        return 0;
    errno = ENOMEM;
    return 1;
}

static size_t iov_len(const struct iovec *iov, int n)
{
    size_t len = 0;
    for (int i = 0; i < n; i++)
        len += iov[i].iov_len;
    return len;
}

ssize_t write(int fd, const void *buf, size_t len)
{
    static ssize_t (*real)(int, const void *, size_t);
    if (!real)
        real = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    return should_fail(fd, len) ? -1 : real(fd, buf, len);
}

ssize_t writev(int fd, const struct iovec *iov, int n)
{
    static ssize_t (*real)(int, const struct iovec *, int);
    if (!real)
        real = (ssize_t (*)(int, const struct iovec *, int))dlsym(RTLD_NEXT, "writev");
    return should_fail(fd, iov_len(iov, n)) ? -1 : real(fd, iov, n);
}

ssize_t send(int fd, const void *buf, size_t len, int flags)
{
    static ssize_t (*real)(int, const void *, size_t, int);
    if (!real)
        real = (ssize_t (*)(int, const void *, size_t, int))dlsym(RTLD_NEXT, "send");
    return should_fail(fd, len) ? -1 : real(fd, buf, len, flags);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    static ssize_t (*real)(int, const struct msghdr *, int);
    if (!real)
        real = (ssize_t (*)(int, const struct msghdr *, int))dlsym(RTLD_NEXT, "sendmsg");
    return should_fail(fd, iov_len(msg->msg_iov, (int)msg->msg_iovlen)) ? -1 : real(fd, msg, flags);
}
