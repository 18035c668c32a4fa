//! Whatever bytes arrive, the pipeline answers with a verdict and never panics: random
//! frames, and valid frames with random corruption (the shapes malformed traffic takes).

use std::sync::Arc;

use kxp_dataplane::flow::L4Proto;
use kxp_dataplane::maglev::{MaglevBackend, MaglevConfig, MaglevTable};
use kxp_dataplane::pipeline::{Tables, Worker, WorkerConfig};
use kxp_dataplane::reject::REJECT_SCRATCH_LEN;
use kxp_dataplane::tables::*;
use proptest::prelude::*;

fn tables() -> Tables {
    let mut node = NodeTable::new("node-a");
    node.addresses = vec![
        "192.168.50.2".parse().unwrap(),
        "fd00:50::2".parse().unwrap(),
    ];
    node.cluster_cidrs = vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd00:244::/56".parse().unwrap(),
    ];
    node.service_cidrs = vec![
        "10.96.0.0/16".parse().unwrap(),
        "fd00:96::/112".parse().unwrap(),
    ];
    let up = node.add_interface(Interface {
        name: "eth0".into(),
        kind: IfaceKind::Uplink,
        mac: [2, 0, 0, 0, 0, 1],
    });
    let pod = node.add_interface(Interface {
        name: "veth-a".into(),
        kind: IfaceKind::Pod,
        mac: [2, 0, 0, 0, 1, 1],
    });
    node.add_neighbour(
        "10.244.1.2".parse().unwrap(),
        Neighbour {
            mac: [0xa, 0x58, 0xa, 0xf4, 1, 2],
            iface: pod,
        },
    );
    node.add_neighbour(
        "fd00:244::2".parse().unwrap(),
        Neighbour {
            mac: [0xa, 0x58, 0xa, 0xf4, 1, 3],
            iface: pod,
        },
    );
    node.add_neighbour(
        "192.168.50.1".parse().unwrap(),
        Neighbour {
            mac: [2, 0, 0, 0, 0, 0xfe],
            iface: up,
        },
    );
    node.add_route(Route {
        dst: "0.0.0.0/0".parse().unwrap(),
        via: "192.168.50.1".parse().unwrap(),
    });
    let mut services = ServiceTable::new();
    for (vip, backend) in [("10.96.0.10", "10.244.1.2"), ("fd00:96::10", "fd00:244::2")] {
        for proto in [L4Proto::Tcp, L4Proto::Udp, L4Proto::Sctp] {
            let endpoints = vec![Backend {
                addr: backend.parse().unwrap(),
                port: 8080,
                ready: true,
                serving: true,
                terminating: false,
                local: true,
                weight: 1,
            }];
            let lb = Arc::new(MaglevTable::build(
                &[MaglevBackend { id: 7, weight: 1 }],
                &MaglevConfig::default(),
            ));
            let id = services.add_service_port(Arc::new(ServicePort {
                name: ServicePortName {
                    namespace: "default".into(),
                    name: "web".into(),
                    port_name: proto.as_str().into(),
                },
                proto,
                endpoints,
                cluster_lb: lb.clone(),
                local_lb: lb,
                policy: ServicePolicy::default(),
            }));
            services
                .add_frontend(
                    FrontendKey {
                        addr: vip.parse().unwrap(),
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
    }
    Tables {
        services: Arc::new(services),
        node: Arc::new(node),
    }
}

/// A valid pod -> ClusterIP frame to mutate.
fn seed(v6: bool, proto: u8) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([0xa, 0x58, 0xa, 0xf4, 1, 2], [2, 0, 0, 0, 1, 1]);
    let b = if v6 {
        b.ipv6(
            "fd00:244::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            "fd00:96::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            64,
        )
    } else {
        b.ipv4([10, 244, 1, 2], [10, 96, 0, 10], 64)
    };
    let payload = [0xabu8; 40];
    let mut out = Vec::new();
    match proto {
        6 => {
            let b = b.tcp(40000, 80, 1, 65535).syn();
            b.write(&mut out, &payload).unwrap();
        }
        1 | 58 => {
            // An ICMP error quoting a TCP header.
            let inner = seed(v6, 6);
            if v6 {
                b.icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
                    .write(&mut out, &inner[14..])
                    .unwrap();
            } else {
                b.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: 1400,
                    },
                ))
                .write(&mut out, &inner[14..])
                .unwrap();
            }
        }
        _ => {
            let b = b.udp(40000, 80);
            b.write(&mut out, &payload).unwrap();
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..200)) {
        let t = tables();
        let mut w = Worker::new(WorkerConfig { conntrack: small_ct(), ..WorkerConfig::default() });
        let mut f = frame;
        let mut scratch = vec![0u8; REJECT_SCRATCH_LEN];
        let _ = w.process(&t, &mut f, IfaceId(1), 1_000_000_000, &mut scratch);
        prop_assert_eq!(w.counters.frames, 1);
    }

    #[test]
    fn corrupted_frames_never_panic(
        v6 in any::<bool>(),
        proto in prop::sample::select(vec![6u8, 17, 1]),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let t = tables();
        let mut w = Worker::new(WorkerConfig { conntrack: small_ct(), ..WorkerConfig::default() });
        let mut f = seed(v6, if v6 && proto == 1 { 58 } else { proto });
        for (i, b) in flips {
            let at = i.index(f.len());
            f[at] = b;
        }
        if do_cut {
            let n = cut.index(f.len() + 1);
            f.truncate(n);
        }
        let mut scratch = vec![0u8; REJECT_SCRATCH_LEN];
        for ingress in [IfaceId(0), IfaceId(1)] {
            let mut g = f.clone();
            let _ = w.process(&t, &mut g, ingress, 1_000_000_000, &mut scratch);
        }
        prop_assert_eq!(w.counters.frames, 2);
    }
}

fn small_ct() -> kxp_dataplane::conntrack::ConntrackConfig {
    kxp_dataplane::conntrack::ConntrackConfig {
        capacity: 1024,
        ..Default::default()
    }
}

#[test]
fn seeds_are_forwarded_intact() {
    // The unmutated seeds are real service traffic: make sure the property tests above
    // exercise the NAT path, not only the parser's rejections.
    let t = tables();
    let mut w = Worker::new(WorkerConfig {
        conntrack: small_ct(),
        ..WorkerConfig::default()
    });
    let mut scratch = vec![0u8; REJECT_SCRATCH_LEN];
    for v6 in [false, true] {
        for proto in [6u8, 17] {
            let mut f = seed(v6, proto);
            let v = w.process(&t, &mut f, IfaceId(1), 1_000_000_000, &mut scratch);
            assert!(
                matches!(v, kxp_dataplane::verdict::Verdict::Forward { .. }),
                "{v:?}"
            );
        }
    }
}
