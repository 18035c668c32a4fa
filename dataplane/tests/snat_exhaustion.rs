//! A full masquerade port space fails fast: the flow that finds it full is dropped and
//! counted (`snat_ports_exhausted`) after one bounded probe run, and for the backoff that
//! follows each new flow to the same backend costs a few lookups, not a full run; the
//! flows already established keep working.

mod support;

use kxp_dataplane::pipeline::{Worker, WorkerConfig};
use kxp_dataplane::tables::IfaceId;
use kxp_dataplane::verdict::{DropReason, ForwardReason, Verdict};

const UPLINK: IfaceId = IfaceId(0);
const MS: u64 = 1_000_000;

/// A UDP datagram from an off-cluster client `172.16.x.y:5000` to the ClusterIP (which is
/// masqueraded: off-cluster source, cluster CIDR known).
fn datagram(client: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 9, 9], [2, 0, 0, 0, 0, 1])
        .ipv4(
            [172, 16, (client >> 8) as u8, client as u8],
            [10, 96, 0, 10],
            64,
        )
        .udp(5000, 80);
    let mut out = Vec::new();
    b.write(&mut out, b"hello").unwrap();
    out
}

#[test]
fn full_port_space_fails_fast_and_counts() {
    let tables = support::tables();
    let mut w = Worker::new(WorkerConfig {
        snat_ports: (61000, 61015), // 16 ports for the one backend
        snat_probe_limit: 64,
        snat_exhausted_probe_limit: 2,
        snat_exhausted_backoff_ms: 100,
        ..WorkerConfig::default()
    });
    let mut scratch = [0u8; 1536];
    let t0 = 10_000 * MS;
    let mut send = |w: &mut Worker, client: u16, now: u64| {
        let mut f = datagram(client);
        w.process(&tables, &mut f, UPLINK, now, &mut scratch)
    };

    // 16 flows take the 16 ports; their first-fit probing may retry a few ports.
    for c in 0..16 {
        let v = send(&mut w, c, t0);
        assert!(
            matches!(
                v,
                Verdict::Forward {
                    reason: ForwardReason::NewFlow,
                    ..
                }
            ),
            "flow {c}: {v:?}"
        );
    }
    // The 17th finds the space full after one run over all 16 ports.
    let before = w.counters.snat_probes;
    assert_eq!(
        send(&mut w, 100, t0),
        Verdict::Drop(DropReason::SnatPortsExhausted)
    );
    assert_eq!(w.counters.snat_probes - before, 16);

    // During the backoff: 1,000 more new flows, at most 2 probes each.
    let before = w.counters.snat_probes;
    for c in 0..1_000 {
        assert_eq!(
            send(&mut w, 200 + c, t0 + MS),
            Verdict::Drop(DropReason::SnatPortsExhausted)
        );
    }
    assert_eq!(w.counters.snat_probes - before, 2_000);
    assert_eq!(w.counters.dropped(DropReason::SnatPortsExhausted), 1_001);

    // Established flows are unaffected.
    assert!(matches!(
        send(&mut w, 3, t0 + 2 * MS),
        Verdict::Forward {
            reason: ForwardReason::Established,
            ..
        }
    ));

    // After the backoff a full run again (the space is still full), then backoff again.
    let before = w.counters.snat_probes;
    assert_eq!(
        send(&mut w, 5000, t0 + 101 * MS),
        Verdict::Drop(DropReason::SnatPortsExhausted)
    );
    assert_eq!(w.counters.snat_probes - before, 16);
    let before = w.counters.snat_probes;
    send(&mut w, 5001, t0 + 102 * MS);
    assert_eq!(w.counters.snat_probes - before, 2);
}
