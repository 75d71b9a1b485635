/* LD_PRELOAD shim for TFF's worker_binary, which can only listen on every interface ([::]:port).
 *
 * When FEDMNIST_BIND_ADDRESS is set, a bind() to the wildcard address (0.0.0.0 or ::) binds to that
 * address instead, with the same port. An IPv4 address on an IPv6 socket becomes its v4-mapped form
 * (::ffff:a.b.c.d), which a dual-stack socket such as gRPC's accepts. Other binds are untouched, and
 * so is every bind when the variable is unset. It fails closed: an address it cannot use (unparsable,
 * or IPv6 on an IPv4 socket) makes the wildcard bind fail instead of listening everywhere.
 * Built by fedmnist/bind.py.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int real_bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real;
    if (!real) {
        real = (bind_fn)dlsym(RTLD_NEXT, "bind");
        if (!real) {
            errno = ENOSYS;
            return -1;
        }
    }
    return real(fd, addr, len);
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    const char *wanted = getenv("FEDMNIST_BIND_ADDRESS");
    if (!wanted || !*wanted || !addr)
        return real_bind(fd, addr, len);

    struct in_addr v4;
    struct in6_addr v6;
    int is_v4 = inet_pton(AF_INET, wanted, &v4) == 1;
    int is_v6 = !is_v4 && inet_pton(AF_INET6, wanted, &v6) == 1;

    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in sin;
        memcpy(&sin, addr, sizeof sin);
        if (sin.sin_addr.s_addr != htonl(INADDR_ANY))
            return real_bind(fd, addr, len);
        if (!is_v4) {
            errno = EADDRNOTAVAIL;
            return -1;
        }
        sin.sin_addr = v4;
        return real_bind(fd, (const struct sockaddr *)&sin, sizeof sin);
    }
    if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 sin6;
        memcpy(&sin6, addr, sizeof sin6);
        if (memcmp(&sin6.sin6_addr, &in6addr_any, sizeof in6addr_any) != 0)
            return real_bind(fd, addr, len);
        if (is_v4) {
            memset(&sin6.sin6_addr, 0, sizeof sin6.sin6_addr);
            sin6.sin6_addr.s6_addr[10] = 0xff;
            sin6.sin6_addr.s6_addr[11] = 0xff;
            memcpy(&sin6.sin6_addr.s6_addr[12], &v4, sizeof v4);
        } else if (is_v6) {
            sin6.sin6_addr = v6;
        } else {
            errno = EADDRNOTAVAIL;
            return -1;
        }
        return real_bind(fd, (const struct sockaddr *)&sin6, sizeof sin6);
    }
    return real_bind(fd, addr, len);
}
