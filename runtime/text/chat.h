/* Chat prompts for the DeepSeek family: OpenAI-style messages rendered to the text the Jinja
 * chat_template of DeepSeek-V3 / R1 (tokenizer_config.json) produces, by a renderer written in
 * C. Tokenizing that text is tokenizer.h's business (encode it with add_special false: the
 * template writes BOS itself). */
#ifndef DUET_CHAT_H
#define DUET_CHAT_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"

/* Read-only after creation; any thread may render with it. */
typedef struct chat_template chat_template;

typedef struct chat_opts {
    /* Append "<｜Assistant｜>" for the model's turn (not after a trailing tool output, whose
     * closing tag already hands the turn over, as in the template). */
    bool add_generation_prompt;
    /* R1: "<think>\n" after the generation prompt, so the model starts by reasoning. */
    bool think_prefix;
    /* R1: an earlier assistant turn keeps only the text after its last "</think>". */
    bool strip_reasoning;
} chat_opts;

/* Reads bos_token and chat_template from DIR/tokenizer_config.json. The template is recognised,
 * not interpreted: one with R1's "</think>" stripping or "<think>\n" generation prompt turns
 * on those options in chat_default_opts(); a template that does not look like DeepSeek's gets a
 * warning, and is rendered the DeepSeek-V3 way all the same. */
duet_status chat_load(const char *dir, chat_template **tpl_p);
/* A template from its parts (tests, or a model without tokenizer_config.json). bos_token is
 * copied; r1 sets the R1 defaults. */
duet_status chat_create(const char *bos_token, bool r1, chat_template **tpl_p);
void chat_destroy(chat_template *tpl);

/* The options the template itself implies, with add_generation_prompt true. */
chat_opts chat_default_opts(const chat_template *tpl);

/* Renders messages (a JSON array of {role, content, tool_calls?}) to *text_p (heap,
 * NUL-terminated, caller frees) exactly as the DeepSeek-V3 template does, including its
 * quirks: system messages anywhere are joined with "\n\n" right after BOS; the second and later
 * tool calls of the whole conversation are each closed with "<｜tool▁calls▁end｜>
 * <｜end▁of▁sentence｜>" and the first is not; an assistant message with content ignores its
 * tool_calls.
 * Beyond the template:
 * - content may be an array of parts; the "text" parts are joined with "\n" (as vLLM does);
 *   other part types are DUET_ERR_UNSUPPORTED.
 * - an assistant message without content is taken as content null (a tool-call turn).
 * - role "developer" (OpenAI's newer name for system) is taken as "system".
 * Input the template would fail on or silently drop (not an array, a message not an object,
 * missing or unknown role, content not a string where one is needed, malformed tool_calls)
 * is DUET_ERR_INVALID, with a one-line reason for the client in err (err_cap bytes, may be
 * NULL). Nothing is logged: the caller owns the request. */
duet_status chat_render(const chat_template *tpl, const cJSON *messages, const chat_opts *opts,
                        char **text_p, size_t *len_p, char *err, size_t err_cap);

#endif
