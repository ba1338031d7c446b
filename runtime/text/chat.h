/* Chat prompts: OpenAI-style messages rendered by the model's own Jinja chat_template (from
 * tokenizer_config.json, or --chat-template), after the same message preparation vLLM does.
 * Interpreting Jinja is jinja.h's business; tokenizing the text is tokenizer.h's (encode it with
 * add_special false: the templates write BOS themselves). */
#ifndef DUET_CHAT_H
#define DUET_CHAT_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"

/* Read-only after creation; any thread may render with it. */
typedef struct chat_template chat_template;

typedef struct chat_opts {
    /* The template's add_generation_prompt. */
    bool add_generation_prompt;
    /* The request's "tools" (a JSON array), or NULL: the template sees none. */
    const cJSON *tools;
    /* The request's chat_template_kwargs (a JSON object) or NULL: each member becomes a template
     * variable, over add_generation_prompt, tools and the special tokens as in vLLM (a member
     * named "messages" is ignored). DeepSeek-V3.1 reads "thinking". */
    const cJSON *kwargs;
} chat_opts;

/* Reads the chat template of a tokenizer directory: tokenizer_config.json's "chat_template"
 * (a string, or a list of {name, template} where "default" is used), else DIR/chat_template.jinja,
 * and bos_token / eos_token (strings or {"content": ...}). The template is parsed here: one it
 * cannot interpret is refused with one log line naming the construct and the line
 * (DUET_ERR_UNSUPPORTED, or DUET_ERR_FORMAT for a syntax error); no template at all is
 * DUET_ERR_NOT_FOUND. */
duet_status chat_load(const char *dir, chat_template **tpl_p);
/* The same with vLLM's --chat-template: override NULL = the checkpoint's; else the path of a
 * file, or, when no such file exists and the text has "{", "}" or a newline in it, the template
 * itself. The special tokens still come from DIR (empty when it has no tokenizer_config.json). */
duet_status chat_load_template(const char *dir, const char *override, chat_template **tpl_p);
/* A template from its text (tests, tools). bos and eos may be NULL (empty). Parse errors are
 * logged as in chat_load. */
duet_status chat_create(const char *source, const char *bos, const char *eos,
                        chat_template **tpl_p);
/* A template from its text with like's special tokens (like may be NULL: empty ones), for a
 * request's own chat_template. Nothing is logged: a refusal ("line N: ...") goes to err
 * (err_cap bytes) for the client; DUET_ERR_UNSUPPORTED or DUET_ERR_FORMAT as jinja_parse. */
duet_status chat_derive(const chat_template *like, const char *source, chat_template **tpl_p,
                        char *err, size_t err_cap);
void chat_destroy(chat_template *tpl);

/* add_generation_prompt true, no tools, no kwargs. */
chat_opts chat_default_opts(const chat_template *tpl);

/* Renders messages (a JSON array of {role, content, ...}) to *text_p (heap, NUL-terminated,
 * caller frees). The messages are first prepared as vLLM prepares them for a template that
 * takes string content:
 * - content: a string as is; null or missing is ""; an array of parts becomes the text of its
 *   text parts ("text", "input_text", "output_text", "refusal", "thinking", or plain strings)
 *   joined by "\n"; any other part type is DUET_ERR_UNSUPPORTED.
 * - assistant tool_calls: each function's "arguments" string is parsed into a JSON value (the
 *   templates tojson it; unparsable text becomes {}); an empty list is dropped.
 * - role, name, tool_call_id and (assistant) reasoning are kept; role "developer" is taken as
 *   "system". Other fields are dropped.
 * - a role other than system, developer, user, assistant or tool is refused (vLLM would pass it
 *   on, and DeepSeek's templates would drop the message without a word).
 * Input that cannot be prepared (not an array, a message not an object, a role not a string,
 * content of another type, malformed tool_calls) is DUET_ERR_INVALID; a template that fails on
 * the conversation (raise_exception, an undefined value used, ...) is DUET_ERR_INVALID too, and
 * DUET_ERR_TOO_LONG past the rendering limits. Either way a one-line reason for the client is in
 * err (err_cap bytes, may be NULL). Nothing is logged: the caller owns the request. */
duet_status chat_render(const chat_template *tpl, const cJSON *messages, const chat_opts *opts,
                        char **text_p, size_t *len_p, char *err, size_t err_cap);

#endif
