//! `Worker::process_batch` is `Worker::process` on each frame in turn, and the IPv4 fast
//! path (`pipeline/fast.rs`) is the general path: the same rewritten bytes, verdicts,
//! reject answers, counters and conntrack state, whatever the traffic (new flows, their
//! replies and retransmissions in the same batch, rejects, ICMP errors, corrupted frames,
//! replies with TTL 1 or 0, no UDP checksum, lying lengths, expiry between rounds,
//! batches longer than `BATCH_SIZE`). Three workers see the same frames: one through
//! `process`, one through `process_batch`, both with the fast path, and one through
//! `process` with the fast path off.

use std::net::IpAddr;

use etherparse::PacketBuilder;
use kxp_dataplane::parse::{parse, Parsed};
use kxp_dataplane::pipeline::{Worker, WorkerConfig};
use kxp_dataplane::reject::REJECT_SCRATCH_LEN;
use kxp_dataplane::tables::IfaceId;
use kxp_dataplane::verdict::Verdict;
use proptest::prelude::*;

mod support;
use support::{seed, tables};

const POD: IfaceId = IfaceId(1);
const UPLINK: IfaceId = IfaceId(0);

/// A frame from `src:sport` to `dst:dport` (TCP with `flags`, UDP, or SCTP).
fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8, flags: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([0xa, 0x58, 0xa, 0xf4, 1, 2], [2, 0, 0, 0, 1, 1]);
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let mut out = Vec::new();
    let payload = [0x5au8; 12];
    match proto {
        6 => {
            let mut t = b.tcp(sport, dport, 1000, 65535);
            if flags & 0x02 != 0 {
                t = t.syn();
            }
            if flags & 0x10 != 0 {
                t = t.ack(1);
            }
            if flags & 0x01 != 0 {
                t = t.fin();
            }
            if flags & 0x04 != 0 {
                t = t.rst();
            }
            t.write(&mut out, &payload).unwrap();
        }
        17 => b.udp(sport, dport).write(&mut out, &payload).unwrap(),
        _ => {
            // SCTP: etherparse has no builder; an IP packet with a common header.
            let mut v = Vec::new();
            b.udp(sport, dport).write(&mut v, &payload).unwrap();
            let l3 = 14;
            let l4 = if src.is_ipv4() { l3 + 20 } else { l3 + 40 };
            if src.is_ipv4() {
                v[l3 + 9] = 132;
                v[l3 + 10] = 0;
                v[l3 + 11] = 0;
                let c = !fold(&v[l3..l4]);
                v[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            } else {
                v[l3 + 6] = 132;
            }
            v[l4 + 4..l4 + 12].fill(0);
            out = v;
        }
    }
    out
}

fn fold(data: &[u8]) -> u16 {
    let mut s: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The reply to a forwarded frame: its tuple reversed.
fn reply_to(out: &[u8], flags: u8) -> Option<Vec<u8>> {
    match parse(out).ok()? {
        Parsed::Transport { key, .. } => Some(frame(
            key.dst,
            key.src,
            key.dport,
            key.sport,
            key.proto as u8,
            flags,
        )),
        _ => None,
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A first packet from client `client` (0..4: pods; 4..8: external, masqueraded).
    New {
        v6: bool,
        client: u8,
        sport: u8,
        proto: u8,
        port: u8,
        flags: u8,
    },
    /// The reply to the `idx`-th forwarded frame of the previous round, altered by
    /// `tweak` (see [`tweak`]).
    Reply { idx: usize, flags: u8, tweak: u8 },
    /// The `idx`-th frame of this round again (a retransmission in the same batch).
    Again { idx: usize },
    /// A seed frame (SYN, UDP, ICMP error) with a few bytes changed.
    Corrupt {
        v6: bool,
        proto: u8,
        flips: Vec<(usize, u8)>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), 0..8u8, 0..6u8, prop::sample::select(vec![6u8, 17, 132]), 0..3u8,
              prop::sample::select(vec![0x02u8, 0x10, 0x11, 0x04, 0x12]))
            .prop_map(|(v6, client, sport, proto, port, flags)| Op::New { v6, client, sport, proto, port, flags }),
        4 => (0..64usize, prop::sample::select(vec![0x12u8, 0x10, 0x11, 0x04]),
              prop::sample::select(vec![0u8, 0, 0, 0, 1, 2, 3, 4, 5]))
            .prop_map(|(idx, flags, tweak)| Op::Reply { idx, flags, tweak }),
        1 => (0..64usize).prop_map(|idx| Op::Again { idx }),
        1 => (any::<bool>(), prop::sample::select(vec![6u8, 17, 1]),
              proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4))
            .prop_map(|(v6, proto, flips)| Op::Corrupt { v6, proto, flips }),
    ]
}

fn client(v6: bool, i: u8) -> (IpAddr, IfaceId) {
    let pod = i < 4;
    let a = match (v6, pod) {
        (false, true) => format!("10.244.1.{}", 2 + i),
        (false, false) => format!("172.16.0.{}", i),
        (true, true) => format!("fd00:244::{}", 2 + i),
        (true, false) => format!("2001:db8::{}", i),
    };
    (a.parse().unwrap(), if pod { POD } else { UPLINK })
}

/// Alters an IPv4 frame: 1 TTL 1, 2 TTL 0 (both with a right header checksum), 3 UDP
/// checksum 0 ("none"), 4 IPv4 total length one more than the frame holds, 5 one byte of
/// IP options (IHL 6, checksum fixed). Anything else, or an IPv6 frame: unchanged.
fn tweak(f: &mut Vec<u8>, k: u8) {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let fix = |f: &mut Vec<u8>, ihl: usize| {
        f[24] = 0;
        f[25] = 0;
        let c = !fold(&f[14..14 + ihl]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    };
    match k {
        1 | 2 => {
            f[22] = 2 - k;
            fix(f, 20);
        }
        3 if f[23] == 17 => {
            f[40] = 0;
            f[41] = 0;
        }
        4 => {
            let total = u16::from_be_bytes([f[16], f[17]]) + 1;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            fix(f, 20);
        }
        5 => {
            f.splice(34..34, [1u8, 1, 1, 1]);
            f[14] = 0x46;
            let total = u16::from_be_bytes([f[16], f[17]]) + 4;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            fix(f, 24);
        }
        _ => {}
    }
}

/// Everything observable about a worker.
fn state(w: &Worker) -> String {
    let mut flows: Vec<String> = w.conntrack.iter().map(|m| format!("{m:?}")).collect();
    flows.sort();
    format!(
        "{:?}\n{:?}\n{:?}\n{}",
        w.counters,
        w.conntrack.stats(),
        w.conntrack.len(),
        flows.join("\n")
    )
}

fn run(rounds: Vec<(Vec<Op>, u8)>, capacity: usize) -> Result<(), TestCaseError> {
    let t = tables();
    let cfg = WorkerConfig {
        conntrack: kxp_dataplane::conntrack::ConntrackConfig {
            capacity,
            capacity_v6: capacity,
            ..Default::default()
        },
        snat_ports: (40000, 40015),
        snat_probe_limit: 8,
        ..WorkerConfig::default()
    };
    let mut a = Worker::new(cfg.clone());
    let mut b = Worker::new(cfg.clone());
    let mut c = Worker::new(WorkerConfig {
        fast_path: false,
        ..cfg
    });
    let mut scratch_a = vec![0u8; REJECT_SCRATCH_LEN];
    let mut scratch_b = vec![0u8; REJECT_SCRATCH_LEN];
    let mut now = 1_000_000_000u64;
    let mut forwarded: Vec<Vec<u8>> = Vec::new();
    for (ops, advance) in rounds {
        now += u64::from(advance) * 1_000_000_000;
        let mut frames: Vec<(Vec<u8>, IfaceId)> = Vec::new();
        for op in ops {
            match op {
                Op::New {
                    v6,
                    client: c,
                    sport,
                    proto,
                    port,
                    flags,
                } => {
                    let (src, iface) = client(v6, c);
                    let vip: IpAddr = if v6 { "fd00:96::10" } else { "10.96.0.10" }
                        .parse()
                        .unwrap();
                    let dport = [80, 81, 80][usize::from(port)];
                    let f = frame(src, vip, 30000 + u16::from(sport), dport, proto, flags);
                    frames.push((f, iface));
                }
                Op::Reply {
                    idx,
                    flags,
                    tweak: k,
                } => {
                    if !forwarded.is_empty() {
                        if let Some(mut f) = reply_to(&forwarded[idx % forwarded.len()], flags) {
                            tweak(&mut f, k);
                            frames.push((f, POD));
                        }
                    }
                }
                Op::Again { idx } => {
                    if !frames.is_empty() {
                        let f = frames[idx % frames.len()].clone();
                        frames.push(f);
                    }
                }
                Op::Corrupt { v6, proto, flips } => {
                    let mut f = seed(v6, if v6 && proto == 1 { 58 } else { proto });
                    for (at, byte) in flips {
                        let n = f.len();
                        f[at % n] = byte;
                    }
                    frames.push((f, POD));
                }
            }
        }
        // One by one through `process`.
        let mut out_a = Vec::new();
        for (f, iface) in &frames {
            let mut f = f.clone();
            let v = a.process(&t, &mut f, *iface, now, &mut scratch_a);
            let reject = match v {
                Verdict::Reject { len, .. } => scratch_a[..len].to_vec(),
                _ => Vec::new(),
            };
            out_a.push((f, format!("{v:?}"), reject));
        }
        // One by one through the general path only.
        let mut out_c = Vec::new();
        for (f, iface) in &frames {
            let mut f = f.clone();
            let v = c.process(&t, &mut f, *iface, now, &mut scratch_a);
            let reject = match v {
                Verdict::Reject { len, .. } => scratch_a[..len].to_vec(),
                _ => Vec::new(),
            };
            out_c.push((f, format!("{v:?}"), reject));
        }
        prop_assert_eq!(&out_a, &out_c);
        prop_assert_eq!(state(&a), state(&c));
        // All at once through `process_batch`.
        let mut bufs: Vec<Vec<u8>> = frames.iter().map(|(f, _)| f.clone()).collect();
        let ingress: Vec<IfaceId> = frames.iter().map(|&(_, i)| i).collect();
        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|f| f.as_mut_slice()).collect();
        let mut out_b = Vec::new();
        let mut next = 0;
        b.process_batch(
            &t,
            &mut refs,
            &ingress,
            now,
            &mut scratch_b,
            |i, f, v, s| {
                assert_eq!(i, next, "frames are done in order");
                next += 1;
                let reject = match v {
                    Verdict::Reject { len, .. } => s[..len].to_vec(),
                    _ => Vec::new(),
                };
                out_b.push((f.to_vec(), format!("{v:?}"), reject));
            },
        );
        prop_assert_eq!(next, frames.len());
        prop_assert_eq!(&out_a, &out_b);
        prop_assert_eq!(state(&a), state(&b));
        forwarded = out_a
            .into_iter()
            .filter(|(_, v, _)| v.starts_with("Forward"))
            .map(|(f, _, _)| f)
            .collect();
        a.housekeeping(now);
        b.housekeeping(now);
        c.housekeeping(now);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn process_batch_is_process_in_order(
        rounds in proptest::collection::vec(
            (proptest::collection::vec(op(), 0..150), prop::sample::select(vec![0u8, 0, 1, 31, 200])),
            1..6,
        ),
        small in any::<bool>(),
    ) {
        // A small table also exercises eviction and refusals.
        run(rounds, if small { 8 } else { 4096 })?;
    }
}
