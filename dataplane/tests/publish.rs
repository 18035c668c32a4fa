//! Table generations reach workers lock-free, and a new generation purges the flows it no
//! longer backs (UDP included) while flows to terminating endpoints keep working.

use std::sync::Arc;

use kxp_dataplane::conntrack::ConntrackConfig;
use kxp_dataplane::flow::L4Proto;
use kxp_dataplane::pipeline::{Tables, Worker, WorkerConfig};
use kxp_dataplane::publish::TablePublisher;
use kxp_dataplane::reject::REJECT_SCRATCH_LEN;
use kxp_dataplane::tables::*;
use kxp_dataplane::verdict::{ForwardReason, Verdict};

mod support;
use support::{backend, node, service_port};

fn tables(endpoints: Vec<Backend>) -> Tables {
    let mut services = ServiceTable::new();
    for proto in [L4Proto::Tcp, L4Proto::Udp] {
        let id = services.add_service_port(Arc::new(service_port("web", proto, endpoints.clone())));
        services
            .add_frontend(
                FrontendKey {
                    addr: "10.96.0.10".parse().unwrap(),
                    proto,
                    port: 80,
                },
                Frontend {
                    kind: FrontendKind::ClusterIp,
                    service_port: id,
                },
            )
            .unwrap();
    }
    Tables {
        services: Arc::new(services),
        node: Arc::new(node()),
    }
}

fn udp(sport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([0xa, 0x58, 0xa, 0xf4, 1, 2], [2, 0, 0, 0, 1, 1])
        .ipv4([10, 244, 1, 2], [10, 96, 0, 10], 64)
        .udp(sport, 80)
        .write(&mut out, b"hello")
        .unwrap();
    out
}

fn backend_of(frame: &[u8], v: Verdict) -> String {
    let Verdict::Forward { start, len, .. } = v else {
        panic!("not forwarded: {v:?}")
    };
    let p = etherparse::SlicedPacket::from_ethernet(&frame[start..start + len]).unwrap();
    match p.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => ip.header().destination_addr().to_string(),
        _ => panic!("not ipv4"),
    }
}

#[test]
fn new_generation_purges_flows_to_removed_endpoints_only() {
    let gen1 = tables(vec![
        backend("10.244.1.2", true, false),
        backend("10.244.1.3", true, false),
        backend("10.244.1.4", true, false),
    ]);
    let publisher = TablePublisher::new(gen1);
    let mut sub = publisher.subscribe();
    let mut w = Worker::new(WorkerConfig {
        conntrack: ConntrackConfig {
            capacity: 4096,
            capacity_v6: 16,
            ..Default::default()
        },
        ..WorkerConfig::default()
    });
    let mut scratch = vec![0u8; REJECT_SCRATCH_LEN];
    let now = 1_000_000_000;
    // 200 UDP flows spread over the three endpoints.
    let mut chosen = Vec::new();
    for sport in 10000..10200u16 {
        let mut f = udp(sport);
        let v = w.process(sub.tables(), &mut f, IfaceId(1), now, &mut scratch);
        chosen.push((sport, backend_of(&f, v)));
    }
    assert_eq!(w.conntrack.len(), 200);
    for b in ["10.244.1.2", "10.244.1.3", "10.244.1.4"] {
        assert!(chosen.iter().any(|(_, c)| c == b), "no flow chose {b}");
    }
    assert!(!sub.refresh(), "nothing was published yet");

    // Generation 2: .3 is terminating (still serving), .4 is gone.
    publisher.publish(tables(vec![
        backend("10.244.1.2", true, false),
        backend("10.244.1.3", false, true),
    ]));
    assert!(sub.refresh());
    w.tables_changed();
    let mut steps = 0;
    while w.revalidate_step(sub.tables()) {
        steps += 1;
        assert!(steps < 100_000);
    }
    let gone = chosen.iter().filter(|(_, c)| c == "10.244.1.4").count();
    assert_eq!(w.conntrack.len(), 200 - gone);
    assert_eq!(w.counters.purged_flows, gone as u64);

    // Surviving flows keep their backend (terminating included); purged ones are
    // re-balanced as new flows onto what is left.
    for (sport, before) in &chosen {
        let mut f = udp(*sport);
        let v = w.process(
            sub.tables(),
            &mut f,
            IfaceId(1),
            now + 1_000_000,
            &mut scratch,
        );
        let Verdict::Forward { reason, .. } = v else {
            panic!("{v:?}")
        };
        let after = backend_of(&f, v);
        if before == "10.244.1.4" {
            assert_eq!(reason, ForwardReason::NewFlow);
            assert_ne!(after, "10.244.1.4");
        } else {
            assert_eq!(reason, ForwardReason::Established);
            assert_eq!(&after, before);
        }
    }
}
