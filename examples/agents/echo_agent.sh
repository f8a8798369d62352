#!/usr/bin/env bash
# An oonode agent in plain bash (no jq, no python):
#   oonode host --exec "bash examples/agents/echo_agent.sh"
# One JSON request per line on stdin; chunk lines, then one result line on stdout. See
# docs/agent-protocol.md.
#
# It never decodes JSON: a JSON string's text, escapes and all, is put back between
# quotes as it came, which is valid JSON again. Only the top-level "id" and "prompt"
# can match the patterns below, since a quote inside a string is always escaped (\").
set -uf   # -f: a prompt of `*` stays a word, not a list of files

printf '%s\n' '{"ready":true,"name":"echo-sh","summary":"I echo your message, word by word.","examples":["hello there"]}'

string='"((\\.|[^"\\])*)"'   # a JSON string; its text (still escaped) is the first group
while IFS= read -r line; do
  [[ $line =~ \"id\":$string ]] || continue
  id=${BASH_REMATCH[1]}
  [[ $line =~ \"prompt\":$string ]] || { printf '{"id":"%s","error":"no prompt"}\n' "$id"; continue; }
  prompt=${BASH_REMATCH[1]}
  # JSON never escapes a space, and no escape contains one: splitting on spaces is safe.
  for word in $prompt; do
    printf '{"id":"%s","chunk":"%s "}\n' "$id" "$word"
  done
  # The history (`messages`) has one "role" per earlier message.
  rest=${line//\"role\":/}
  earlier=$(( (${#line} - ${#rest}) / 7 ))
  if (( earlier == 0 )); then
    printf '{"id":"%s","result":"%s"}\n' "$id" "$prompt"
  else
    printf '{"id":"%s","result":"%s (turn %d)"}\n' "$id" "$prompt" $(( earlier / 2 + 1 ))
  fi
done
