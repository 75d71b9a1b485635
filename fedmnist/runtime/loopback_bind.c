/* LD_PRELOAD shim for TFF's worker_binary, which can only listen on every interface ([::]:port) and
 * accepts every connection. Built by fedmnist/runtime/bind.py; docs/security.md says what it guarantees.
 *
 * Where it listens (each variable changes only the wildcard bind of a nonzero port, the server's):
 * - FEDMNIST_UNIX_SOCKET=path: a Unix stream socket at `path` replaces the TCP socket (at the same file
 *   descriptor), so the worker has no TCP port at all; getsockname() on it still answers the TCP
 *   address gRPC asked for. fedmnist puts `path` in a directory only its user can enter.
 * - FEDMNIST_BIND_ADDRESS=ip: the same port on that address only. An IPv4 address on an IPv6 socket
 *   becomes its v4-mapped form (::ffff:a.b.c.d), which a dual-stack socket such as gRPC's accepts.
 * Both fail closed: an address it cannot use, or a second wildcard bind, makes the bind fail instead
 * of listening everywhere. Other binds are untouched.
 *
 * Whom it accepts:
 * - FEDMNIST_PEER_UID=uid: accept() and accept4() hand the worker only connections made by a socket of
 *   that user: on a Unix socket the peer's credentials (SO_PEERCRED); on TCP the owner of the connecting
 *   socket as the kernel's socket diagnostics report it (NETLINK_SOCK_DIAG, the interface of `ss`), which
 *   exists only for a peer in this network namespace, so on loopback. Any other connection, or one
 *   whose owner cannot be established, is closed before the worker reads a byte of it, and accept goes
 *   on to the next one.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*getsockname_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);

static void *next_symbol(const char *name) {
    void *symbol = dlsym(RTLD_NEXT, name);
    if (!symbol)
        errno = ENOSYS;
    return symbol;
}

static int real_bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real;
    if (!real && !(real = (bind_fn)next_symbol("bind")))
        return -1;
    return real(fd, addr, len);
}

static int real_getsockname(int fd, struct sockaddr *addr, socklen_t *len) {
    static getsockname_fn real;
    if (!real && !(real = (getsockname_fn)next_symbol("getsockname")))
        return -1;
    return real(fd, addr, len);
}

/* --- Where it listens ------------------------------------------------------------------------- */

static int swapped_fd = -1; /* the listening socket now a Unix socket, and the address it stands for */
static struct sockaddr_storage swapped_addr;
static socklen_t swapped_len;

static int is_wildcard_server_bind(const struct sockaddr *addr, socklen_t len) {
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;
        return sin->sin_addr.s_addr == htonl(INADDR_ANY) && sin->sin_port != 0;
    }
    if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;
        return memcmp(&sin6->sin6_addr, &in6addr_any, sizeof in6addr_any) == 0 && sin6->sin6_port != 0;
    }
    return 0;
}

static int bind_unix(int fd, const struct sockaddr *addr, socklen_t len, const char *path) {
    struct sockaddr_un sun;
    if (swapped_fd >= 0 || strlen(path) >= sizeof sun.sun_path || len > (socklen_t)sizeof swapped_addr) {
        errno = EADDRNOTAVAIL;
        return -1;
    }
    memset(&sun, 0, sizeof sun);
    sun.sun_family = AF_UNIX;
    strcpy(sun.sun_path, path);
    int flags = fcntl(fd, F_GETFL);
    int unix_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (flags >= 0 && (flags & O_NONBLOCK) ? SOCK_NONBLOCK : 0), 0);
    if (unix_fd < 0)
        return -1;
    if (real_bind(unix_fd, (const struct sockaddr *)&sun, sizeof sun) < 0 || dup3(unix_fd, fd, O_CLOEXEC) < 0) {
        int error = errno;
        close(unix_fd);
        errno = error;
        return -1;
    }
    close(unix_fd);
    memcpy(&swapped_addr, addr, len);
    swapped_len = len;
    swapped_fd = fd;
    return 0;
}

static int bind_address(int fd, const struct sockaddr *addr, const char *wanted) {
    struct in_addr v4;
    struct in6_addr v6;
    int is_v4 = inet_pton(AF_INET, wanted, &v4) == 1;
    int is_v6 = !is_v4 && inet_pton(AF_INET6, wanted, &v6) == 1;

    if (addr->sa_family == AF_INET) {
        struct sockaddr_in sin;
        memcpy(&sin, addr, sizeof sin);
        if (!is_v4) {
            errno = EADDRNOTAVAIL;
            return -1;
        }
        sin.sin_addr = v4;
        return real_bind(fd, (const struct sockaddr *)&sin, sizeof sin);
    }
    struct sockaddr_in6 sin6;
    memcpy(&sin6, addr, sizeof sin6);
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

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    const char *path = getenv("FEDMNIST_UNIX_SOCKET");
    const char *wanted = getenv("FEDMNIST_BIND_ADDRESS");
    if (!addr || !is_wildcard_server_bind(addr, len))
        return real_bind(fd, addr, len);
    if (path && *path)
        return bind_unix(fd, addr, len, path);
    if (wanted && *wanted)
        return bind_address(fd, addr, wanted);
    return real_bind(fd, addr, len);
}

int getsockname(int fd, struct sockaddr *addr, socklen_t *len) {
    if (fd >= 0 && fd == swapped_fd && addr && len) {
        memcpy(addr, &swapped_addr, *len < swapped_len ? *len : swapped_len);
        *len = swapped_len;
        return 0;
    }
    return real_getsockname(fd, addr, len);
}

/* --- Whom it accepts -------------------------------------------------------------------------- */

/* The uid FEDMNIST_PEER_UID names: 1 and *uid set when it is set, 0 when unset, -1 when unusable. */
static int wanted_peer(uid_t *uid) {
    const char *text = getenv("FEDMNIST_PEER_UID");
    if (!text || !*text)
        return 0;
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno || *end || value != (uid_t)value)
        return -1;
    *uid = (uid_t)value;
    return 1;
}

/* The 16 bytes of an IPv6 address, or the 4 of an IPv4 one (also when v4-mapped); its length. */
static int address_bytes(const struct sockaddr_storage *addr, unsigned char out[16], unsigned short *port) {
    if (addr->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;
        memcpy(out, &sin->sin_addr, 4);
        *port = sin->sin_port;
        return 4;
    }
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;
        *port = sin6->sin6_port;
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            memcpy(out, &sin6->sin6_addr.s6_addr[12], 4);
            return 4;
        }
        memcpy(out, &sin6->sin6_addr, 16);
        return 16;
    }
    return 0;
}

/* The owner of the TCP socket at the other end of the accepted connection `fd`, from the kernel's
 * socket diagnostics: that socket's source is our peer and its destination is us. 0 when found. */
static int tcp_peer_owner(int fd, uid_t *uid) {
    struct sockaddr_storage local, peer;
    socklen_t local_len = sizeof local, peer_len = sizeof peer;
    if (real_getsockname(fd, (struct sockaddr *)&local, &local_len) < 0 ||
        getpeername(fd, (struct sockaddr *)&peer, &peer_len) < 0)
        return -1;
    unsigned char local_ip[16], peer_ip[16];
    unsigned short local_port = 0, peer_port = 0;
    int local_size = address_bytes(&local, local_ip, &local_port);
    int peer_size = address_bytes(&peer, peer_ip, &peer_port);
    if (!local_size || local_size != peer_size)
        return -1;

    struct {
        struct nlmsghdr header;
        struct inet_diag_req_v2 request;
    } message;
    memset(&message, 0, sizeof message);
    message.header.nlmsg_len = sizeof message;
    message.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    message.header.nlmsg_flags = NLM_F_REQUEST;
    message.request.sdiag_family = local_size == 4 ? AF_INET : AF_INET6;
    message.request.sdiag_protocol = IPPROTO_TCP;
    message.request.idiag_states = ~0U;
    message.request.id.idiag_sport = peer_port;
    message.request.id.idiag_dport = local_port;
    memcpy(message.request.id.idiag_src, peer_ip, peer_size);
    memcpy(message.request.id.idiag_dst, local_ip, local_size);
    message.request.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
    message.request.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;

    int diag = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (diag < 0)
        return -1;
    struct timeval patience = {1, 0}; /* the kernel answers at once; never wait on it for long */
    setsockopt(diag, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    struct sockaddr_nl kernel;
    memset(&kernel, 0, sizeof kernel);
    kernel.nl_family = AF_NETLINK;
    long answer[2048];
    ssize_t size = -1;
    if (sendto(diag, &message, sizeof message, 0, (struct sockaddr *)&kernel, sizeof kernel) == (ssize_t)sizeof message)
        size = recv(diag, answer, sizeof answer, 0);
    close(diag);

    int found = -1;
    for (struct nlmsghdr *h = (struct nlmsghdr *)answer; size > 0 && NLMSG_OK(h, (size_t)size); h = NLMSG_NEXT(h, size)) {
        if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY || h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg)))
            break; /* NLMSG_ERROR: no such socket */
        const struct inet_diag_msg *m = NLMSG_DATA(h);
        /* The connecting socket itself, not a listener or a closed one's remains (uid 0 in the kernel). */
        enum { LISTENING = 10, TIME_WAIT = 6, CLOSED = 7, NEW_SYN_RECV = 12 };
        if (m->id.idiag_sport == peer_port && m->id.idiag_dport == local_port && m->idiag_state != LISTENING &&
            m->idiag_state != TIME_WAIT && m->idiag_state != CLOSED && m->idiag_state != NEW_SYN_RECV) {
            *uid = m->idiag_uid;
            found = 0;
        }
        break;
    }
    return found;
}

static int peer_owner(int fd, uid_t *uid) {
    struct sockaddr_storage local;
    socklen_t local_len = sizeof local;
    if (real_getsockname(fd, (struct sockaddr *)&local, &local_len) < 0)
        return -1;
    if (local.ss_family == AF_UNIX) {
        struct ucred credentials;
        socklen_t size = sizeof credentials;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &size) < 0)
            return -1;
        *uid = credentials.uid;
        return 0;
    }
    return tcp_peer_owner(fd, uid);
}

/* 1 to hand the accepted connection `fd` to the worker; 0 after closing it. */
static int admit(int fd) {
    uid_t wanted, owner;
    int rule = wanted_peer(&wanted);
    if (rule == 0)
        return 1;
    int known = rule > 0 && peer_owner(fd, &owner) == 0;
    if (known && owner == wanted)
        return 1;
    char line[160];
    int n = known ? snprintf(line, sizeof line, "fedmnist: refused a connection from uid %u (only uid %u may connect)\n",
                             (unsigned)owner, (unsigned)wanted)
                  : snprintf(line, sizeof line, "fedmnist: refused a connection whose owner cannot be established\n");
    if (n > 0 && write(2, line, (size_t)n) < 0) {
        /* the log is best effort */
    }
    close(fd);
    return 0;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    static accept4_fn real;
    if (!real && !(real = (accept4_fn)next_symbol("accept4")))
        return -1;
    socklen_t room = len ? *len : 0;
    for (;;) {
        int connection = real(fd, addr, len, flags);
        if (connection < 0 || admit(connection))
            return connection;
        if (len)
            *len = room;
    }
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    static accept_fn real;
    if (!real && !(real = (accept_fn)next_symbol("accept")))
        return -1;
    socklen_t room = len ? *len : 0;
    for (;;) {
        int connection = real(fd, addr, len);
        if (connection < 0 || admit(connection))
            return connection;
        if (len)
            *len = room;
    }
}
