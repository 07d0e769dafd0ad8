"""The hostile-client probes of issue 10, against a running Tidemark, with the server's
RSS after each (read from /proc) and timings. Usage:

    tidemark demo &                      # or serve; note its PID
    python3 benches/probes.py --pid PID [--port 5433]

Needs psycopg 3 (pip install 'psycopg[binary]'). Every probe is bounded; all traffic
goes to the given loopback port.
"""
import argparse
import socket
import statistics
import struct
import threading
import time

import psycopg


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def connect(port, **kw):
    return psycopg.connect(host="127.0.0.1", port=port, user="tidemark", dbname="tidemark", autocommit=True, **kw)


def outcome(fn):
    t = time.perf_counter()
    try:
        fn()
        res = "ok"
    except psycopg.Error as e:
        res = f"{e.sqlstate} {str(e).splitlines()[0][:70]}"
    return res, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--port", type=int, default=5433)
    a = ap.parse_args()
    port, pid = a.port, a.pid
    rows = []

    def report(name, res, secs):
        rows.append((name, res, secs, rss_mb(pid)))
        print(f"| {name} | {res} | {secs:.2f} s | {rss_mb(pid):.0f} MB |", flush=True)

    print(f"start RSS: {rss_mb(pid):.0f} MB")
    print("| probe | answer | time | RSS after |\n|---|---|---|---|")
    c = connect(port)
    c.execute("select 1")

    report("`select 1+1+...+1`, 2,000 terms", *outcome(lambda: c.execute("select " + "+".join(["1"] * 2000)).fetchall()))
    ors = " OR ".join(f"entity_id = 'acct-{i:05d}'" for i in range(2000))
    report("2,000-term `entity_id = ... OR ...` on usage", *outcome(lambda: c.execute(f"select count(*) from usage where {ors}").fetchall()))
    report("5,000-term `+` chain", *outcome(lambda: c.execute("select " + "+".join(["1"] * 5000)).fetchall()))
    report("`COPY usage FROM '/dev/zero' WITH (FORMAT csv)`", *outcome(lambda: c.execute("COPY usage FROM '/dev/zero' WITH (FORMAT csv)")))
    report("`COPY usage FROM '/etc/os-release'`", *outcome(lambda: c.execute("COPY usage FROM '/etc/os-release'")))
    report("`COPY (SELECT 2) TO '/tmp/x'`", *outcome(lambda: c.execute("COPY (SELECT 2) TO '/tmp/tidemark-probe-x'")))
    before = c.execute("select count(*) from usage").fetchone()[0]
    ins = lambda rid: (f"insert into usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) "
                       f"values ('{rid}', 'acct-probe', 'storage', 'Get', 'Requests', 1, now())")
    res, secs = outcome(lambda: c.execute(f"{ins('probe-a')}; select 1/0; {ins('probe-b')}"))
    after = c.execute("select count(*) from usage").fetchone()[0]
    report(f"`insert A; select 1/0; insert B` (rows stored: {after - before})", res, secs)
    res, secs = outcome(lambda: c.execute(f"BEGIN; {ins('probe-c')}; ROLLBACK"))
    c.execute("ROLLBACK")  # the failed block stays open, as in PostgreSQL
    after2 = c.execute("select count(*) from usage").fetchone()[0]
    report(f"`BEGIN; INSERT; ROLLBACK` in one message (rows stored: {after2 - after})", res, secs)

    # A heavy query with a timeout, and select 1 on another connection meanwhile.
    heavy = connect(port)
    heavy.execute("SET statement_timeout = 1000")
    pings = []
    stop = threading.Event()

    def ping():
        p = connect(port)
        while not stop.is_set():
            t = time.perf_counter()
            p.execute("select 1").fetchall()
            pings.append(time.perf_counter() - t)
            time.sleep(0.02)
        p.close()

    th = threading.Thread(target=ping)
    th.start()
    time.sleep(0.2)
    pings.clear()
    res, secs = outcome(lambda: heavy.execute("select count(*) from usage a, usage b").fetchall())
    stop.set()
    th.join()
    report("`SET statement_timeout = 1000`; self cross join of usage", res, secs)
    if pings:
        print(f"  select 1 on another connection meanwhile: {len(pings)} pings, p50 {statistics.median(pings)*1000:.1f} ms, max {max(pings)*1000:.1f} ms")

    # Cancel request.
    victim = connect(port)
    timer = threading.Timer(0.5, victim.cancel)
    timer.start()
    res, secs = outcome(lambda: victim.execute("select count(*) from generate_series(1, 10000000000)").fetchall())
    report("CancelRequest after 0.5 s of `count(*)` over 1e10 rows", res, secs)

    # A client that leaves mid-query.
    s = socket.create_connection(("127.0.0.1", port))
    params = b"user\0tidemark\0database\0tidemark\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    time.sleep(0.2)
    q = b"select count(*) from generate_series(1, 10000000001) probe_departed\0"
    s.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
    time.sleep(0.5)
    s.close()
    t = time.perf_counter()
    status = None
    while time.perf_counter() - t < 30:
        r = c.execute("select status from system.query_log where query like '%probe_departed%' and query not like '%query_log%'").fetchall()
        if r:
            status = r[0][0]
            break
        time.sleep(0.2)
    report(f"client leaves during `count(*)` over 1e10 rows (logged as {status})", "stopped" if status else "still running", time.perf_counter() - t)

    # Timeouts hammered on a LIMIT cross join, then the pipelines' state.
    h = connect(port)
    h.execute("SET statement_timeout = 1")
    t = time.perf_counter()
    for _ in range(20):
        try:
            h.execute("select a.record_id from usage a, usage b limit 5").fetchall()
        except psycopg.Error:
            pass
    busy = c.execute("select sum(in_flight), sum(queued) from system.pipelines").fetchone()
    report(f"20 x timeout 1 ms on a LIMIT cross join (pipelines in flight/queued after: {busy[0]}/{busy[1]})", "ok", time.perf_counter() - t)

    # Parse with 65,535 parameters.
    big = "select " + ", ".join(f"${i}" for i in range(1, 65536))
    report("Parse of `select $1, ..., $65535`", *outcome(lambda: c.execute(big, prepare=True)))
    inlist = "select count(*) from usage where entity_id in (" + ", ".join(["%s"] * 65535) + ")"
    report("Parse of `... entity_id IN ($1, ..., $65535)`", *outcome(lambda: c.execute(inlist, [f"acct-{i:05d}" for i in range(65535)], prepare=True).fetchall()))

    # 500 idle sockets, then a real client.
    idle = []
    for _ in range(500):
        try:
            idle.append(socket.create_connection(("127.0.0.1", port)))
        except OSError:
            break
    res, secs = outcome(lambda: connect(port, connect_timeout=30).execute("select 1").fetchall())
    report(f"real client after {len(idle)} idle sockets", res, secs)
    for s in idle:
        s.close()

    # Named prepared statements.
    p = connect(port, prepare_threshold=0)
    p.prepared_max = 100_000  # keep every statement prepared (psycopg closes old ones by default)
    made = 0
    res = "ok"
    t = time.perf_counter()
    try:
        for i in range(20000):
            p.execute(f"select {i}::bigint").fetchall()
            made += 1
    except psycopg.Error as e:
        res = f"{e.sqlstate} after {made}"
    report("20,000 named prepared statements on one connection", res, time.perf_counter() - t)
    p.close()

    # Failing 20 MB queries.
    t = time.perf_counter()
    text = "select '" + "x" * (20 << 20) + "' from no_such_table"
    res = "ok"
    for i in range(30):
        try:
            c.execute(text)
        except psycopg.Error as e:
            res = e.sqlstate
        if i == 14:
            report("15 failing 20 MB queries", res, time.perf_counter() - t)
    report("30 failing 20 MB queries", res, time.perf_counter() - t)

    # Invalid UTF-8.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    time.sleep(0.2)
    s.recv(65536)
    q = b"select '\xff'\0"
    s.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
    time.sleep(0.3)
    data = s.recv(65536)
    code = data.split(b"C", 1)[1][:5].decode() if b"C" in data else "?"
    report("invalid UTF-8 in a simple query", code, 0.0)
    s.close()
    print(f"end RSS: {rss_mb(pid):.0f} MB")


if __name__ == "__main__":
    main()
