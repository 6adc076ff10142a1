#!/usr/bin/env python3
"""Per-hop saga latency after a bench-saga run, from an embedded data directory or the
PostgreSQL database it ran on:
   python3 bench/hops.py DATA_DIR|postgres://URL
Reads the outbox, bus log and inbox timestamps of the order, inventory, payment and bus stores
and prints p50/p90/p99 (ms) of each hop of the place-order saga."""
import sqlite3, sys, datetime, subprocess
if len(sys.argv) != 2:
    sys.exit("usage: bench/hops.py DATA_DIR|postgres://URL")
d=sys.argv[1]
def t(s):
    return datetime.datetime.fromisoformat(s.replace('Z','+00:00')).timestamp()*1000 if s else None
q="""
SELECT o.created_at, bl.published_at, o.sent_at, ii.processed_at,
       io.created_at, bl2.published_at, io.sent_at, pi.processed_at, po.created_at, bl3.published_at, po.sent_at, oi.processed_at
FROM main.outbox o
JOIN bus.bus_log bl ON bl.message_id=o.id
JOIN inventory.inbox ii ON ii.message_id=o.id
JOIN inventory.outbox io ON io.aggregate_id=o.aggregate_id AND io.topic='inventory.reserved'
JOIN bus.bus_log bl2 ON bl2.message_id=io.id
JOIN payments.inbox pi ON pi.message_id=io.id
JOIN payments.outbox po ON po.aggregate_id=o.aggregate_id AND po.topic='payment.succeeded'
JOIN bus.bus_log bl3 ON bl3.message_id=po.id
JOIN main.inbox oi ON oi.message_id=po.id
WHERE o.topic='order.created'
"""
if d.startswith('postgres'):
    # One schema per service in the database: main is the order service's.
    out=subprocess.run(['psql','-At','-F','|',d,'-c',q.replace('main.','orders.')],
                       check=True,capture_output=True,text=True).stdout
    raw=[line.split('|') for line in out.splitlines() if line]
else:
    c=sqlite3.connect(d+'/orders.db')
    for n in ['inventory','payments','bus']:
        c.execute(f"ATTACH '{d}/{n}.db' AS {n}")
    raw=c.execute(q)
rows=[[t(x) for x in r] for r in raw]
print(len(rows),'orders')
def pct(v,p):
    v=sorted(v); return v[min(len(v)-1,int(len(v)*p))]
spec=[('order created->published',0,1),('  published->marked',1,2),('published->inv handled',1,3),('inv created->published',4,5),('  published->marked',5,6),('published->pay handled',5,7),('pay created->published',8,9),('  published->marked',9,10),('published->order handled',9,11),('TOTAL',0,11)]
for name,a,b in spec:
    v=[r[b]-r[a] for r in rows if r[a] and r[b]]
    print(f"{name:26s} p50 {pct(v,.5):7.1f}  p90 {pct(v,.9):7.1f}  p99 {pct(v,.99):7.1f}")
import collections
w=collections.defaultdict(list)
t0=min(r[0] for r in rows)
for r in rows:
    w[int((r[0]-t0)/2000)].append(r[11]-r[0])
print(' '.join(f"{k*2}s:{pct(v,.5):.0f}/{pct(v,.99):.0f}" for k,v in sorted(w.items())))
# Each hop's p99 per 10 s window: shows which hop grows if the total does.
spans=[(name,a,b) for name,a,b in spec if not name.startswith('  ')]
print('p99 per 10 s window:', ' | '.join(n.strip() for n,_,_ in spans))
w=collections.defaultdict(list)
for r in rows:
    w[int((r[0]-t0)/10000)].append(r)
for k,rs in sorted(w.items()):
    print(f"{k*10:3d}s", ' '.join(f"{pct([r[b]-r[a] for r in rs if r[a] and r[b]],.99):6.1f}" for _,a,b in spans))
