/* duet's one status code for the whole project, grouped by blast radius.
 * Foreign codes (errno, MPI, UCX, libuv, CUDA, NCCL) are converted at the boundary by the
 * macros in the module that calls them; this header knows none of those libraries. */
#ifndef DUET_STATUS_H
#define DUET_STATUS_H

typedef enum duet_status {
    DUET_OK = 0,
    /* The caller's input is wrong; nothing else is affected. */
    DUET_ERR_INVALID = -1,     /* malformed argument, request field or file content */
    DUET_ERR_TOO_LONG = -2,    /* prompt or request beyond a configured limit */
    DUET_ERR_NOT_FOUND = -3,   /* no such file, tensor, model, request or route */
    DUET_ERR_UNSUPPORTED = -4, /* well-formed but not something duet implements */
    DUET_ERR_AUTH = -5,        /* missing or wrong credentials */
    DUET_ERR_FORMAT = -6,      /* a file or message does not follow its format */
    /* A resource ran short; the same call may succeed later. */
    DUET_ERR_NO_MEMORY = -20,
    DUET_ERR_BUSY = -21, /* overloaded or shutting down */
    DUET_ERR_TIMEOUT = -22,
    DUET_ERR_CANCELED = -23,
    /* A peer or the OS failed; the connection or request is lost, the process is fine. */
    DUET_ERR_IO = -40,
    DUET_ERR_PEER = -41, /* peer lost, refused us, or sent something we reject */
    /* The process can no longer serve. */
    DUET_ERR_DEVICE = -60, /* GPU or backend failure */
    DUET_ERR_COMM = -61,   /* collective failed or timed out */
    DUET_ERR_INTERNAL = -62,
} duet_status;

/* Never NULL; a static string. */
const char *duet_strerror(duet_status st);

#endif
