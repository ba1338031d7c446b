/* The tokenizer DeepSeek ships: Hugging Face tokenizer.json (byte-level BPE, added tokens, Split
 * pre-tokenizers) plus tokenizer_config.json, reproducing the ids of HF `tokenizers`.
 * Chat templates live in chat.h; sampling and stop strings are the engine's business. */
#ifndef DUET_TOKENIZER_H
#define DUET_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

/* Read-only after tok_load: any thread may call any function below on it at the same time.
 * For DeepSeek-V3 loading takes about 0.2 s and 45 MB at peak, and the tokenizer keeps 12 MB. */
typedef struct tok_tokenizer tok_tokenizer;

/* Reads DIR/tokenizer.json and DIR/tokenizer_config.json. A missing or malformed file, or a
 * tokenizer.json feature duet does not implement (another model than BPE, a normalizer, a
 * pre-tokenizer other than Split/ByteLevel), is refused with one log line naming the file. */
duet_status tok_load(const char *dir, tok_tokenizer **tok_p);
void tok_destroy(tok_tokenizer *tok);

/* Encodes len bytes of text into *ids_p (heap, caller frees; NULL when *n_p is 0).
 * add_special: apply tokenizer.json's post-processor the way HF `tokenizers` does with
 * add_special_tokens=True. For the DeepSeek files that processor is ByteLevel, which adds
 * nothing: transformers' LlamaTokenizerFast (and so vLLM's /v1/completions) prepends BOS on its
 * own when tok_add_bos() is true; callers that want that behaviour prepend tok_bos_id().
 * Added tokens (special or not) in the text are always recognised, as in HF.
 * Text need not be valid UTF-8: invalid bytes are encoded as themselves through the byte-level
 * alphabet (never U+FFFD), so tok_id_to_piece() of the ids gives back the exact input bytes. */
duet_status tok_encode(const tok_tokenizer *tok, const char *text, size_t len, bool add_special,
                       int32_t **ids_p, size_t *n_p);

/* Decodes ids to NUL-terminated UTF-8 in *text_p (heap, caller frees), like HF decode(): the
 * pieces' bytes are joined and each maximal invalid UTF-8 subsequence becomes U+FFFD.
 * skip_special drops tokens marked special. An id outside [0, tok_vocab_size()) or one with no
 * token is DUET_ERR_INVALID. */
duet_status tok_decode(const tok_tokenizer *tok, const int32_t *ids, size_t n, bool skip_special,
                       char **text_p, size_t *len_p);

/* One past the largest token id, added tokens included (128815 for DeepSeek-V3; the model's
 * embedding has 129280 rows, the rest are ids no text produces). */
int32_t tok_vocab_size(const tok_tokenizer *tok);
/* The id of a token by its written form: an added token's content ("<｜end▁of▁sentence｜>") or
 * a vocabulary entry in byte-level spelling ("Ġthe"). -1 when there is none. */
int32_t tok_token_to_id(const tok_tokenizer *tok, const char *token);
/* The raw bytes an id stands for (possibly not valid UTF-8 on its own). The pointer lives as
 * long as tok. DUET_ERR_INVALID for an unknown id. */
duet_status tok_id_to_piece(const tok_tokenizer *tok, int32_t id, const char **bytes_p,
                            size_t *len_p);
/* True for added tokens marked "special" (false for unknown ids). */
bool tok_is_special(const tok_tokenizer *tok, int32_t id);
/* From tokenizer_config.json; -1 when the file names none. */
int32_t tok_bos_id(const tok_tokenizer *tok);
int32_t tok_eos_id(const tok_tokenizer *tok);
/* tokenizer_config.json add_bos_token / add_eos_token (see tok_encode on add_special). */
bool tok_add_bos(const tok_tokenizer *tok);
bool tok_add_eos(const tok_tokenizer *tok);
/* The longest piece in bytes. */
size_t tok_max_piece_len(const tok_tokenizer *tok);

/* Streaming detokenizer for one response: fed ids one at a time, it hands back only whole UTF-8
 * characters, holding an incomplete multi-byte sequence until the next token completes it, and
 * turning bytes that can never complete into U+FFFD exactly as tok_decode does, so that the
 * outputs of every put plus finish, concatenated, equal tok_decode of the whole sequence.
 * One thread at a time per stream; the tokenizer must outlive it. No allocation after create. */
typedef struct tok_stream tok_stream;

duet_status tok_stream_create(const tok_tokenizer *tok, bool skip_special, tok_stream **s_p);
void tok_stream_destroy(tok_stream *s);
/* Feeds one id. *text_p and *len_p: the newly complete text (maybe empty), in the stream's own
 * buffer, valid until the next call on s. An unknown id is DUET_ERR_INVALID and leaves the
 * stream as it was. */
duet_status tok_stream_put(tok_stream *s, int32_t id, const char **text_p, size_t *len_p);
/* Ends the sequence: a held incomplete sequence becomes U+FFFD. The stream is then empty and
 * may be reused for a new sequence. */
void tok_stream_finish(tok_stream *s, const char **text_p, size_t *len_p);

#endif
