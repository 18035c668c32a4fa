//! The node file: what kxp knows about the node it runs on (addresses, networks,
//! interfaces, neighbours, routes), compiled into a [`NodeTable`].
//!
//! ```yaml
//! name: node-a
//! addresses: [192.168.50.2, "fd00:50::2"]      # node IPs (v4 and/or v6), at least one
//! clusterCIDRs: [10.244.0.0/16, "fd00:244::/56"]
//! serviceCIDRs: [10.96.0.0/16, "fd00:96::/112"]
//! nodePortAddresses: []     # optional; IPs, or CIDRs selecting node addresses; empty = all
//! zone: zone-a              # optional; topology.kubernetes.io/zone, for topology hints
//! interfaces:
//!   - {name: eth0, kind: uplink, mac: "02:00:00:00:00:01"}
//!   - {name: veth-pod-a, kind: pod, mac: "02:00:00:00:01:01"}
//!   - {name: host, kind: host, mac: "02:00:00:00:00:ff"}
//! neighbours:
//!   - {ip: 10.244.1.2, mac: "0a:58:0a:f4:01:02", interface: veth-pod-a}
//! routes:
//!   - {dst: 0.0.0.0/0, via: 192.168.50.1}   # via must be a neighbour
//! ```
//!
//! Unknown fields are rejected. Every error names the file and the field path, e.g.
//! `node.yaml: neighbours[2].mac: "zz" is not a MAC address`.

use core::net::IpAddr;
use std::collections::HashSet;
use std::path::Path;

use ipnet::IpNet;
use kxp_dataplane::tables::{IfaceKind, Interface, Neighbour, NodeTable, Route};
use serde::Deserialize;

use crate::error::ConfigError;

/// At most this many interfaces (an interface id is a `u8`; 255 stays free as "none").
pub const MAX_INTERFACES: usize = 255;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeFile {
    name: String,
    addresses: Vec<String>,
    #[serde(default, rename = "clusterCIDRs")]
    cluster_cidrs: Vec<String>,
    #[serde(default, rename = "serviceCIDRs")]
    service_cidrs: Vec<String>,
    #[serde(default)]
    node_port_addresses: Vec<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    interfaces: Vec<InterfaceSpec>,
    #[serde(default)]
    neighbours: Vec<NeighbourSpec>,
    #[serde(default)]
    routes: Vec<RouteSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InterfaceSpec {
    name: String,
    kind: String,
    mac: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NeighbourSpec {
    ip: String,
    mac: String,
    interface: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    dst: String,
    via: String,
}

/// Reads and compiles a node file. Errors name the file as given in `path`.
pub fn load_node_file(path: impl AsRef<Path>) -> Result<NodeTable, ConfigError> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(&origin, e))?;
    parse_node(&text, &origin)
}

/// Compiles a node file's text; `origin` names it in errors.
pub fn parse_node(yaml: &str, origin: &str) -> Result<NodeTable, ConfigError> {
    let file: NodeFile =
        serde_yaml::from_str(yaml).map_err(|e| ConfigError::syntax(origin, e.to_string()))?;
    let invalid = |field: String, message: String| ConfigError::invalid(origin, field, message);

    if file.name.trim().is_empty() {
        return Err(invalid("name".into(), "must not be empty".into()));
    }
    let mut node = NodeTable::new(file.name.trim());

    if file.addresses.is_empty() {
        return Err(invalid(
            "addresses".into(),
            "at least one node address is required".into(),
        ));
    }
    for (i, a) in file.addresses.iter().enumerate() {
        let ip = parse_ip(a).ok_or_else(|| invalid(format!("addresses[{i}]"), not_ip(a)))?;
        if node.addresses.contains(&ip) {
            return Err(invalid(
                format!("addresses[{i}]"),
                format!("{ip} is listed twice"),
            ));
        }
        node.addresses.push(ip);
    }
    for (i, c) in file.cluster_cidrs.iter().enumerate() {
        let net =
            parse_cidr(c).ok_or_else(|| invalid(format!("clusterCIDRs[{i}]"), not_cidr(c)))?;
        node.cluster_cidrs.push(net);
    }
    for (i, c) in file.service_cidrs.iter().enumerate() {
        let net =
            parse_cidr(c).ok_or_else(|| invalid(format!("serviceCIDRs[{i}]"), not_cidr(c)))?;
        node.service_cidrs.push(net);
    }
    for (i, a) in file.node_port_addresses.iter().enumerate() {
        let field = format!("nodePortAddresses[{i}]");
        if let Some(ip) = parse_ip(a) {
            if !node.node_port_addresses.contains(&ip) {
                node.node_port_addresses.push(ip);
            }
        } else if let Some(net) = parse_cidr(a) {
            // kube-proxy's --nodeport-addresses: a CIDR selects the node addresses in it.
            let selected: Vec<IpAddr> = node
                .addresses
                .iter()
                .copied()
                .filter(|ip| net.contains(ip))
                .collect();
            if selected.is_empty() {
                return Err(invalid(
                    field,
                    format!("{net} contains none of the node addresses"),
                ));
            }
            for ip in selected {
                if !node.node_port_addresses.contains(&ip) {
                    node.node_port_addresses.push(ip);
                }
            }
        } else {
            return Err(invalid(
                field,
                format!("{a:?} is neither an IP address nor a CIDR"),
            ));
        }
    }

    if let Some(zone) = &file.zone {
        let zone = zone.trim();
        if zone.is_empty() {
            return Err(invalid(
                "zone".into(),
                "must not be empty (leave it out for no zone)".into(),
            ));
        }
        node.zone = Some(zone.to_string());
    }

    if file.interfaces.len() > MAX_INTERFACES {
        return Err(invalid(
            "interfaces".into(),
            format!(
                "{} interfaces, at most {MAX_INTERFACES} are supported",
                file.interfaces.len()
            ),
        ));
    }
    for (i, spec) in file.interfaces.iter().enumerate() {
        let field = |f: &str| format!("interfaces[{i}].{f}");
        if spec.name.is_empty() {
            return Err(invalid(field("name"), "must not be empty".into()));
        }
        if node.interface_by_name(&spec.name).is_some() {
            return Err(invalid(
                field("name"),
                format!("interface {:?} is listed twice", spec.name),
            ));
        }
        let kind = match spec.kind.as_str() {
            "uplink" => IfaceKind::Uplink,
            "pod" => IfaceKind::Pod,
            "host" => IfaceKind::Host,
            other => {
                return Err(invalid(
                    field("kind"),
                    format!("{other:?} is not one of uplink, pod, host"),
                ))
            }
        };
        let mac = parse_mac(&spec.mac).ok_or_else(|| invalid(field("mac"), not_mac(&spec.mac)))?;
        node.add_interface(Interface {
            name: spec.name.clone(),
            kind,
            mac,
        });
    }

    let mut neighbour_ips = HashSet::new();
    for (i, spec) in file.neighbours.iter().enumerate() {
        let field = |f: &str| format!("neighbours[{i}].{f}");
        let ip = parse_ip(&spec.ip).ok_or_else(|| invalid(field("ip"), not_ip(&spec.ip)))?;
        if !neighbour_ips.insert(ip) {
            return Err(invalid(field("ip"), format!("{ip} is listed twice")));
        }
        let mac = parse_mac(&spec.mac).ok_or_else(|| invalid(field("mac"), not_mac(&spec.mac)))?;
        let iface = node.interface_by_name(&spec.interface).ok_or_else(|| {
            invalid(
                field("interface"),
                format!("no interface is named {:?}", spec.interface),
            )
        })?;
        node.add_neighbour(ip, Neighbour { mac, iface });
    }

    for (i, spec) in file.routes.iter().enumerate() {
        let field = |f: &str| format!("routes[{i}].{f}");
        let dst =
            parse_cidr(&spec.dst).ok_or_else(|| invalid(field("dst"), not_cidr(&spec.dst)))?;
        let via = parse_ip(&spec.via).ok_or_else(|| invalid(field("via"), not_ip(&spec.via)))?;
        if !neighbour_ips.contains(&via) {
            return Err(invalid(
                field("via"),
                format!("next hop {via} is not a neighbour"),
            ));
        }
        node.add_route(Route { dst, via });
    }

    Ok(node)
}

/// Parses `aa:bb:cc:dd:ee:ff` (or `-`-separated) into six bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let mut mac = [0u8; 6];
    let mut parts = s.split(sep);
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse().ok()
}

/// A CIDR, with host bits cleared (`10.244.1.0/16` is `10.244.0.0/16`).
fn parse_cidr(s: &str) -> Option<IpNet> {
    s.trim().parse::<IpNet>().ok().map(|n| n.trunc())
}

fn not_ip(s: &str) -> String {
    format!("{s:?} is not an IP address")
}

fn not_cidr(s: &str) -> String {
    format!("{s:?} is not a CIDR (address/prefix)")
}

fn not_mac(s: &str) -> String {
    format!("{s:?} is not a MAC address")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kxp_dataplane::tables::IfaceId;

    const GOOD: &str = r#"
name: node-a
addresses: [192.168.50.2, "fd00:50::2"]
clusterCIDRs: [10.244.0.0/16, "fd00:244::/56"]
serviceCIDRs: [10.96.0.0/16, "fd00:96::/112"]
nodePortAddresses: []
interfaces:
  - {name: eth0, kind: uplink, mac: "02:00:00:00:00:01"}
  - {name: veth-pod-a, kind: pod, mac: "02:00:00:00:01:01"}
  - {name: host, kind: host, mac: "02:00:00:00:00:ff"}
neighbours:
  - {ip: 10.244.1.2, mac: "0a:58:0a:f4:01:02", interface: veth-pod-a}
  - {ip: 192.168.50.1, mac: "02:00:00:00:00:fe", interface: eth0}
routes:
  - {dst: 0.0.0.0/0, via: 192.168.50.1}
"#;

    fn err(yaml: &str) -> String {
        parse_node(yaml, "node.yaml").unwrap_err().to_string()
    }

    #[test]
    fn parses_the_example() {
        let n = parse_node(GOOD, "node.yaml").unwrap();
        assert_eq!(n.name, "node-a");
        assert_eq!(
            n.addresses,
            vec![
                "192.168.50.2".parse::<IpAddr>().unwrap(),
                "fd00:50::2".parse().unwrap()
            ]
        );
        assert!(n.in_cluster(&"10.244.3.4".parse().unwrap()));
        assert!(n.in_cluster(&"fd00:244::5".parse().unwrap()));
        assert!(n.in_service_cidr(&"10.96.1.1".parse().unwrap()));
        assert!(!n.in_service_cidr(&"10.97.1.1".parse().unwrap()));
        assert_eq!(n.node_port_addresses(), &n.addresses[..]);
        assert_eq!(n.zone, None);
        assert_eq!(n.interfaces.len(), 3);
        assert_eq!(n.interface(IfaceId(1)).kind, IfaceKind::Pod);
        assert_eq!(n.interface_by_name("host"), Some(IfaceId(2)));
        let pod = n.next_hop(&"10.244.1.2".parse().unwrap()).unwrap();
        assert_eq!(pod.iface, IfaceId(1));
        assert_eq!(pod.src_mac, [2, 0, 0, 0, 1, 1]);
        assert_eq!(pod.dst_mac, [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x02]);
        let out = n.next_hop(&"8.8.8.8".parse().unwrap()).unwrap();
        assert_eq!(out.iface, IfaceId(0));
        assert_eq!(out.dst_mac, [2, 0, 0, 0, 0, 0xfe]);
        assert_eq!(n.next_hop(&"2001:db8::1".parse().unwrap()), None);
    }

    #[test]
    fn minimal_file_and_node_port_cidr() {
        let n = parse_node(
            "name: n\naddresses: [10.0.0.5, 192.168.1.5]\nnodePortAddresses: [10.0.0.0/8]\n",
            "x",
        )
        .unwrap();
        assert_eq!(
            n.node_port_addresses(),
            &["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert!(n.interfaces.is_empty());
        assert!(
            err("name: n\naddresses: [10.0.0.5]\nnodePortAddresses: [172.16.0.0/12]\n")
                .contains("nodePortAddresses[0]: 172.16.0.0/12 contains none")
        );
    }

    #[test]
    fn zone_is_read_and_checked() {
        let n = parse_node("name: n\naddresses: [10.0.0.5]\nzone: \" zone-a \"\n", "x").unwrap();
        assert_eq!(n.zone.as_deref(), Some("zone-a"));
        assert_eq!(
            err("name: n\naddresses: [10.0.0.5]\nzone: \"\"\n"),
            "node.yaml: zone: must not be empty (leave it out for no zone)"
        );
    }

    #[test]
    fn bad_mac_names_the_field() {
        let y = GOOD.replace("0a:58:0a:f4:01:02", "zz");
        assert_eq!(
            err(&y),
            r#"node.yaml: neighbours[0].mac: "zz" is not a MAC address"#
        );
        let y = GOOD.replace("02:00:00:00:00:ff", "02:00:00:00:00");
        assert!(
            err(&y).starts_with("node.yaml: interfaces[2].mac: "),
            "{}",
            err(&y)
        );
        assert_eq!(parse_mac("02-00-00-00-00-0A"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00:0a:01"), None);
        assert_eq!(parse_mac("2:00:00:00:00:0a"), None);
    }

    #[test]
    fn unknown_interface_in_neighbour() {
        let y = GOOD.replace("interface: veth-pod-a", "interface: veth-nope");
        assert_eq!(
            err(&y),
            r#"node.yaml: neighbours[0].interface: no interface is named "veth-nope""#
        );
    }

    #[test]
    fn route_via_non_neighbour() {
        let y = GOOD.replace("via: 192.168.50.1", "via: 192.168.50.9");
        assert_eq!(
            err(&y),
            "node.yaml: routes[0].via: next hop 192.168.50.9 is not a neighbour"
        );
    }

    #[test]
    fn too_many_interfaces() {
        let mut y = String::from("name: n\naddresses: [10.0.0.1]\ninterfaces:\n");
        for i in 0..256 {
            y.push_str(&format!(
                "  - {{name: if{i}, kind: pod, mac: \"02:00:00:00:{:02x}:{:02x}\"}}\n",
                i / 256,
                i % 256
            ));
        }
        assert!(err(&y).contains("interfaces: 256 interfaces, at most 255"));
        // 255 is fine.
        let cut: String = y.lines().take(3 + 255).map(|l| format!("{l}\n")).collect();
        assert_eq!(parse_node(&cut, "n").unwrap().interfaces.len(), 255);
    }

    #[test]
    fn needs_an_address() {
        assert_eq!(
            err("name: n\naddresses: []\n"),
            "node.yaml: addresses: at least one node address is required"
        );
        assert!(err("name: n\n").contains("missing field `addresses`"));
        assert_eq!(
            err("name: n\naddresses: [10.0.0.300]\n"),
            r#"node.yaml: addresses[0]: "10.0.0.300" is not an IP address"#
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err("name: n\naddresses: [10.0.0.1]\nneighbours:\n  - {ip: 10.0.0.2, mac: \"02:00:00:00:00:01\", interface: x, colour: red}\n");
        assert!(e.starts_with("node.yaml: "), "{e}");
        assert!(e.contains("neighbours[0]"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = err("name: n\naddresses: [10.0.0.1]\nclusterCidrs: []\n");
        assert!(e.contains("unknown field `clusterCidrs`"), "{e}");
    }

    #[test]
    fn bad_kind_and_cidr() {
        let y = GOOD.replace("kind: host", "kind: loopback");
        assert_eq!(
            err(&y),
            r#"node.yaml: interfaces[2].kind: "loopback" is not one of uplink, pod, host"#
        );
        let y = GOOD.replace("10.96.0.0/16", "10.96.0.0/33");
        assert!(err(&y).starts_with("node.yaml: serviceCIDRs[0]: "));
    }

    #[test]
    fn load_from_file_names_the_path() {
        let dir = std::env::temp_dir().join(format!("kxp-node-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("node.yaml");
        std::fs::write(&p, GOOD.replace("0a:58:0a:f4:01:02", "zz")).unwrap();
        let e = load_node_file(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: neighbours[0].mac", p.display())),
            "{e}"
        );
        let missing = load_node_file(dir.join("nope.yaml")).unwrap_err();
        assert!(matches!(missing, ConfigError::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
