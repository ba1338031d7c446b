/* Subcommands of duet-check, each in its own file: golden (model logits against the
 * transformers reference), tokenizer and chat (tokenizer.json and chat template against the
 * tokenizers reference). Each returns the process exit status and prints a final line
 * "N passed, N failed". */
#ifndef DUET_TOOLS_CHECK_H
#define DUET_TOOLS_CHECK_H

int check_golden_main(int argc, char **argv);
int check_tokenizer_main(int argc, char **argv);
int check_chat_main(int argc, char **argv);

#endif
