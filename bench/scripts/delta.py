#!/usr/bin/env python3
"""Delta compression for keyed messages, measured before it is built (docs/PERFORMANCE.md,
"Compression"): what a member would receive per tick of a ticker stream (50 symbols,
24-hour ticker records as exchanges publish them, each tick moving a few prices) as-is,
permessage-deflate as the gateway sends it (each message on its own), and a delta against
the last value of the same key the member received, as deflate with that value as a preset
dictionary (what a fossil-delta-like scheme approaches for JSON records).

usage: python3 bench/scripts/delta.py [TICKS] [SYMBOLS]"""
import json, random, sys, zlib

TICKS = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
SYMBOLS = int(sys.argv[2]) if len(sys.argv) > 2 else 50
rng = random.Random(7)

def record(symbol, state, seq):
    last = state["last"]
    return json.dumps({
        "e": "24hrTicker", "E": 1765000000000 + seq * 10, "s": symbol,
        "p": f"{state['change']:.8f}", "P": f"{state['change'] / last * 100:.3f}",
        "w": f"{last * 0.998:.8f}", "c": f"{last:.8f}", "Q": f"{state['qty']:.8f}",
        "b": f"{last - 0.01:.8f}", "B": f"{state['bid_qty']:.8f}",
        "a": f"{last + 0.01:.8f}", "A": f"{state['ask_qty']:.8f}",
        "o": f"{state['open']:.8f}", "h": f"{state['high']:.8f}", "l": f"{state['low']:.8f}",
        "v": f"{state['volume']:.8f}", "q": f"{state['quote']:.8f}",
        "O": 1764913600000 + seq * 10, "C": 1765000000000 + seq * 10,
        "F": state["first"], "L": state["first"] + state["trades"], "n": state["trades"],
    }, separators=(",", ":")).encode()

def deflated(data, zdict=None):
    c = zlib.compressobj(6, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY,
                         **({"zdict": zdict} if zdict else {}))
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return len(out) - 4  # the tail is left off on the wire

states = {}
for n in range(SYMBOLS):
    price = rng.uniform(1, 70000)
    states[f"SYM{n}USDT"] = {"last": price, "open": price, "high": price, "low": price,
                             "change": 0.0, "qty": 0.0, "bid_qty": 1.0, "ask_qty": 1.0,
                             "volume": rng.uniform(1e3, 1e6), "quote": 0.0,
                             "first": rng.randrange(10**8), "trades": 0}
previous = {}
totals = {"raw": 0, "deflate": 0, "delta": 0}
for seq in range(TICKS):
    symbol = f"SYM{rng.randrange(SYMBOLS)}USDT"
    s = states[symbol]
    s["last"] *= 1 + rng.uniform(-0.0005, 0.0005)
    s["high"], s["low"] = max(s["high"], s["last"]), min(s["low"], s["last"])
    s["change"] = s["last"] - s["open"]
    s["qty"] = rng.uniform(0, 5)
    s["bid_qty"], s["ask_qty"] = rng.uniform(0, 10), rng.uniform(0, 10)
    s["volume"] += s["qty"]
    s["quote"] += s["qty"] * s["last"]
    s["trades"] += rng.randrange(1, 20)
    message = record(symbol, s, seq)
    totals["raw"] += len(message)
    totals["deflate"] += deflated(message)
    totals["delta"] += deflated(message, previous.get(symbol))
    previous[symbol] = message
for name, total in totals.items():
    print(f"{name:8} {total / TICKS:7.1f} bytes per tick  ({total / totals['raw']:.2f}x raw)")
