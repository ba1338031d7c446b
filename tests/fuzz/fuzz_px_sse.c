/* libFuzzer driver for what the proxy reads of a decode worker's event stream: the bytes are
 * forwarded as they come, and the last TAIL_MAX of them decide whether the stream ended with
 * vLLM's "data: [DONE]" (else the proxy appends an error event and [DONE] itself). The first
 * byte picks how the rest is cut into reads. The tail helpers are static in px_proxy.c, so the
 * file is compiled into this driver as it is; nothing of the proxy is copied here. */
#include "../../proxy/px_proxy.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The property on the whole stream: less trailing CR and LF bytes, it ends with the marker. */
static bool ends_with_done(const char *s, size_t n, size_t *trailing_p) {
    static const char done[] = "data: [DONE]";
    size_t end = n;
    while (end && (s[end - 1] == '\n' || s[end - 1] == '\r')) end--;
    *trailing_p = n - end;
    return end >= sizeof done - 1 && !memcmp(s + end - (sizeof done - 1), done, sizeof done - 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    size_t step = (size_t)(data[0] % 64) + 1;
    const char *in = (const char *)data + 1;
    size_t len = size - 1;
    px_job job;
    memset(&job, 0, sizeof job);
    for (size_t pos = 0; pos < len; pos += step) {
        size_t n = len - pos < step ? len - pos : step;
        tail_add(&job, in + pos, n);
        if (job.tail_len > TAIL_MAX) abort();
        size_t keep = pos + n < TAIL_MAX ? pos + n : TAIL_MAX;
        /* the tail is the last bytes seen, whatever the cuts */
        if (job.tail_len != keep || memcmp(job.tail, in + pos + n - keep, keep)) abort();
    }
    size_t trailing;
    bool want = ends_with_done(in, len, &trailing);
    /* Line ends after the marker use up the remembered bytes: the proxy decides on the last
     * TAIL_MAX, so more than TAIL_MAX - 12 of them hide it (it then ends the stream itself). */
    if (trailing <= TAIL_MAX - 12 && tail_is_done(&job) != want) abort();
    if (tail_is_done(&job) && !want) abort();
    return 0;
}
