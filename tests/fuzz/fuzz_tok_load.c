/* libFuzzer driver for loading a tokenizer directory: bytes before the first NUL are
 * tokenizer.json, the rest tokenizer_config.json (written to a private temporary directory).
 * A file is refused with an error or gives a tokenizer whose every answer is usable: encoding
 * a fixed text and the input itself yields ids with pieces, which decode, also as a stream. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/fileio.h"
#include "base/log.h"
#include "fuzz_tok.h"
#include "text/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char g_dir[64];

static void cleanup_dir(void) {
    char p[128];
    snprintf(p, sizeof p, "%s/tokenizer.json", g_dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/tokenizer_config.json", g_dir);
    unlink(p);
    rmdir(g_dir);
}

static void check_encode(const tok_tokenizer *tok, const char *text, size_t len) {
    int32_t *ids = NULL;
    size_t n = 0;
    duet_status st = tok_encode(tok, text, len, true, &ids, &n);
    if (st != DUET_OK) {
        if (st == DUET_ERR_NO_MEMORY || st == DUET_ERR_INVALID) abort();
        return; /* e.g. a pre-tokenizer regex that gives up on this text */
    }
    fuzz_tok_check_pieces(tok, ids, n, NULL, 0);
    char *whole = NULL;
    size_t whole_len = 0;
    fuzz_tok_check_decode(tok, ids, n, false, &whole, &whole_len);
    free(whole);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_dir[0]) {
        log_set_level(LOG_LEVEL_ERROR + 1);
        snprintf(g_dir, sizeof g_dir, "/tmp/fuzz-tok-XXXXXX");
        if (!mkdtemp(g_dir)) abort();
        atexit(cleanup_dir);
    }
    const char *in = (const char *)data;
    const char *nul = memchr(in, '\0', size);
    size_t json_len = nul ? (size_t)(nul - in) : size;
    const char *cfg = nul ? nul + 1 : "{}";
    size_t cfg_len = nul ? size - json_len - 1 : 2;
    char path[128];
    snprintf(path, sizeof path, "%s/tokenizer.json", g_dir);
    if (fio_write_file(path, in, json_len) != DUET_OK) abort();
    snprintf(path, sizeof path, "%s/tokenizer_config.json", g_dir);
    if (fio_write_file(path, cfg, cfg_len) != DUET_OK) abort();
    tok_tokenizer *tok = NULL;
    if (tok_load(g_dir, &tok) != DUET_OK) return 0;
    static const char sample[] = "Hello world, \xe4\xbd\xa0\xe5\xa5\xbd 123 <|x|> \xff\xfe end";
    check_encode(tok, sample, sizeof sample - 1);
    check_encode(tok, in, json_len < 512 ? json_len : 512);
    (void)tok_bos_id(tok);
    (void)tok_eos_id(tok);
    (void)tok_max_piece_len(tok);
    tok_destroy(tok);
    return 0;
}
