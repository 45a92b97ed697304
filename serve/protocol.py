"""Messages between the router and its worker processes (pickled dicts over a pipe).

Router -> worker (key "op"): PREFILL {rid, attempt, kv_id, tokens, target | None, kv_bits,
max_tokens, sampling}; DECODE {rid, attempt, kv_id, first_token, max_tokens, sampling};
CANCEL {rid, attempt, kv_id (to the decode worker only)}: drop attempts up to ``attempt`` and
discard the KV ``kv_id`` (arrived, arriving or yet to come); SET_ROLE {role}; STOP.

Worker -> router (key "ev"): READY {worker, pid, host, port, load_s, role, layers}; FAILED
{worker, message}; PREFILLED {rid, attempt, worker, first_token, seconds, tokens}; KV_SENT {rid,
attempt, bytes, seconds, transports}; DECODING {rid, attempt, worker}: the KV arrived and the
sequence joined the batch; TOKENS {worker, items: [(rid, attempt, token | None,
finish_reason | None)], batch, seconds}; ROLE {worker, role, seconds}; ERROR {rid, attempt,
where, message}.

``attempt`` counts restarts of a request (after a worker died): messages of older attempts are
ignored by the router.
"""

PREFILL, DECODE, CANCEL, SET_ROLE, STOP = "prefill", "decode", "cancel", "set_role", "stop"
READY, FAILED, PREFILLED, KV_SENT, DECODING, TOKENS, ROLE, ERROR = (
    "ready", "failed", "prefilled", "kv_sent", "decoding", "tokens", "role", "error")
ROLES = ("prefill", "decode", "colocated")
