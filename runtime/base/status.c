/* Strings for duet_status. */
#include "base/status.h"

const char *duet_strerror(duet_status st) {
    switch (st) {
    case DUET_OK:
        return "ok";
    case DUET_ERR_INVALID:
        return "invalid argument";
    case DUET_ERR_TOO_LONG:
        return "too long";
    case DUET_ERR_NOT_FOUND:
        return "not found";
    case DUET_ERR_UNSUPPORTED:
        return "not supported";
    case DUET_ERR_AUTH:
        return "not authorized";
    case DUET_ERR_FORMAT:
        return "bad format";
    case DUET_ERR_NO_MEMORY:
        return "out of memory";
    case DUET_ERR_BUSY:
        return "busy";
    case DUET_ERR_TIMEOUT:
        return "timed out";
    case DUET_ERR_CANCELED:
        return "canceled";
    case DUET_ERR_IO:
        return "i/o error";
    case DUET_ERR_PEER:
        return "peer error";
    case DUET_ERR_DEVICE:
        return "device error";
    case DUET_ERR_COMM:
        return "communication error";
    case DUET_ERR_INTERNAL:
        return "internal error";
    }
    return "unknown status";
}
