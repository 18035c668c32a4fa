//! Shared fixtures for the dataplane's integration tests: a small node and ClusterIP
//! services (TCP, UDP, SCTP; IPv4 and IPv6) built straight from the table types.

#![allow(dead_code)]

use std::sync::Arc;

use kxp_dataplane::flow::L4Proto;
use kxp_dataplane::maglev::{MaglevBackend, MaglevConfig, MaglevTable};
use kxp_dataplane::pipeline::Tables;
use kxp_dataplane::tables::*;

/// node-a: an uplink with a default route, one pod veth with pods 10.244.1.2-4 and
/// fd00:244::2 behind it.
pub fn node() -> NodeTable {
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
    for (ip, last) in [("10.244.1.3", 3u8), ("10.244.1.4", 4)] {
        node.add_neighbour(
            ip.parse().unwrap(),
            Neighbour {
                mac: [0xa, 0x58, 0xa, 0xf4, 2, last],
                iface: pod,
            },
        );
    }
    node
}

/// ClusterIP service port for `proto` with the given endpoints, every ready one in the
/// Maglev table.
pub fn service_port(name: &str, proto: L4Proto, endpoints: Vec<Backend>) -> ServicePort {
    let members: Vec<MaglevBackend> = endpoints
        .iter()
        .enumerate()
        .map(|(i, b)| MaglevBackend {
            id: i as u64 + 1,
            weight: u32::from(b.ready),
        })
        .collect();
    let lb = Arc::new(MaglevTable::build(&members, &MaglevConfig::default()));
    ServicePort {
        name: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port_name: proto.as_str().into(),
        },
        proto,
        endpoints,
        cluster_lb: lb.clone(),
        local_lb: lb,
        policy: ServicePolicy::default(),
    }
}

pub fn backend(addr: &str, ready: bool, terminating: bool) -> Backend {
    Backend {
        addr: addr.parse().unwrap(),
        port: 8080,
        ready,
        serving: ready || terminating,
        terminating,
        local: true,
        weight: 1,
    }
}

pub fn tables() -> Tables {
    let node = node();
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
pub fn seed(v6: bool, proto: u8) -> Vec<u8> {
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
