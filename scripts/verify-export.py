#!/usr/bin/env python3
"""Check the hash chains of a `karmic events export` file without Karmic's code.

Usage: python3 scripts/verify-export.py EXPORT.jsonl

Standard library only. Recomputes every event's hash from its stored fields
(docs/audit.md, "The hash chain") and checks that each aggregate's events follow one
another: sequence 1, 2, 3, ... each chained to the one before. Exits 0 when every
chain holds, 1 at the first broken link (printed), 2 on a malformed file.
An export of part of the history (a filter other than one whole aggregate, or a time
range) starts aggregates in the middle of their chains; check whole exports.
"""

import decimal
import hashlib
import json
import sys

GENESIS = "0" * 64
BODY = ("aggregate_id", "aggregate_type", "event_type", "event_version",
        "metadata", "payload", "recorded_at", "sequence")


def number(x):
    """ECMAScript's Number.prototype.toString, as RFC 8785 asks for non-integers."""
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that read back as the same double.
    _, ds, exp = decimal.Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, ds))
    n = exp + len(digits)  # x = 0.digits * 10**n
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        s = digits + "0" * (n - k)
    elif 0 < n <= 21:
        s = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        s = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        s = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("-" if e < 0 else "+") + str(abs(e))
    return sign + s


def canonical(v):
    """RFC 8785 (JCS), with integers written exactly."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return number(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ",".join(canonical(i) for i in v) + "]"
    if isinstance(v, dict):
        keys = sorted(v, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + canonical(v[k]) for k in keys) + "}"
    raise TypeError(f"not JSON: {v!r}")


def event_hash(prev, line):
    body = {k: line[k] for k in BODY}
    return hashlib.sha256((prev + canonical(body)).encode("utf-8")).hexdigest()


def main(path):
    heads = {}  # (type, id) -> (last sequence, last hash)
    events = 0
    with open(path, encoding="utf-8") as f:
        for number_, text in enumerate(f, 1):
            try:
                line = json.loads(text)
                if not isinstance(line, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in BODY + ("hash",) if k not in line]
                if missing:
                    raise ValueError(f"missing {', '.join(missing)}")
                if type(line["sequence"]) is not int or not isinstance(line["hash"], str):
                    raise ValueError("sequence must be an integer and hash a string")
                key = (line["aggregate_type"], line["aggregate_id"])
                seq, prev = heads.get(key, (0, GENESIS))
                computed = event_hash(prev, line)
            except (ValueError, TypeError, ArithmeticError) as e:
                print(f"line {number_}: not an export line ({e})")
                return 2
            where = (f"line {number_}, position {line.get('position')}: "
                     f"{key[0]} {key[1]} sequence {line['sequence']}")
            if line["sequence"] != seq + 1:
                print(f"{where}: expected sequence {seq + 1}")
                return 1
            if computed != line["hash"]:
                print(f"{where}: the hash does not match")
                return 1
            heads[key] = (line["sequence"], line["hash"])
            events += 1
    print(f"{events} events in {len(heads)} aggregates: every chain holds")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
