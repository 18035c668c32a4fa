//! The network every scenario runs in: one node (`node-a`) with an uplink, pod veths and
//! the host interface; its neighbours; and the peers that send and receive frames.
//!
//! ```text
//!        203.0.113.7 / 2001:db8::7 (client)   198.18.0.0/15 (more of the internet)
//!                       \                      /
//!                 router 192.168.50.1 / fd00:50::1  (02:00:00:00:00:fe)
//!                                 |
//!   node-b 192.168.50.3 ------ eth0 (uplink, 02:00:00:00:00:01)
//!   (pods 10.244.2.0/24)          |
//!                          node-a 192.168.50.2 / fd00:50::2
//!          +--------------+-------+-------+-----------+------+
//!      veth-client    veth-web    veth-web2   veth-web3     host
//!      10.244.1.2     10.244.1.10 10.244.1.11 10.244.1.12
//!      fd00:244::1:2  fd00:244::1:a
//! ```

use core::net::IpAddr;

use crate::packet::Mac;

/// The node file every scenario uses.
pub const NODE_YAML: &str = r#"# node-a: the node kxp runs on in every golden scenario.
name: node-a
addresses: [192.168.50.2, "fd00:50::2"]
clusterCIDRs: [10.244.0.0/16, "fd00:244::/56"]
serviceCIDRs: [10.96.0.0/16, "fd00:96::/112"]
interfaces:
  - {name: eth0, kind: uplink, mac: "02:00:00:00:00:01"}
  - {name: veth-client, kind: pod, mac: "02:00:00:00:01:01"}
  - {name: veth-web, kind: pod, mac: "02:00:00:00:01:02"}
  - {name: veth-web2, kind: pod, mac: "02:00:00:00:01:03"}
  - {name: veth-web3, kind: pod, mac: "02:00:00:00:01:04"}
  - {name: host, kind: host, mac: "02:00:00:00:00:ff"}
neighbours:
  - {ip: 192.168.50.1, mac: "02:00:00:00:00:fe", interface: eth0}
  - {ip: "fd00:50::1", mac: "02:00:00:00:00:fe", interface: eth0}
  - {ip: 192.168.50.3, mac: "02:00:00:00:00:b3", interface: eth0}
  - {ip: 10.244.1.2, mac: "0a:58:0a:f4:01:02", interface: veth-client}
  - {ip: "fd00:244::1:2", mac: "0a:58:0a:f4:01:02", interface: veth-client}
  - {ip: 10.244.1.10, mac: "0a:58:0a:f4:01:0a", interface: veth-web}
  - {ip: "fd00:244::1:a", mac: "0a:58:0a:f4:01:0a", interface: veth-web}
  - {ip: 10.244.1.11, mac: "0a:58:0a:f4:01:0b", interface: veth-web2}
  - {ip: 10.244.1.12, mac: "0a:58:0a:f4:01:0c", interface: veth-web3}
routes:
  - {dst: 10.244.2.0/24, via: 192.168.50.3}
  - {dst: 0.0.0.0/0, via: 192.168.50.1}
  - {dst: "::/0", via: "fd00:50::1"}
"#;

/// A node interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iface {
    pub name: &'static str,
    pub mac: Mac,
    pub uplink: bool,
}

pub const ETH0: Iface = Iface {
    name: "eth0",
    mac: [0x02, 0, 0, 0, 0, 0x01],
    uplink: true,
};
pub const VETH_CLIENT: Iface = Iface {
    name: "veth-client",
    mac: [0x02, 0, 0, 0, 0x01, 0x01],
    uplink: false,
};
pub const VETH_WEB: Iface = Iface {
    name: "veth-web",
    mac: [0x02, 0, 0, 0, 0x01, 0x02],
    uplink: false,
};
pub const VETH_WEB2: Iface = Iface {
    name: "veth-web2",
    mac: [0x02, 0, 0, 0, 0x01, 0x03],
    uplink: false,
};
pub const VETH_WEB3: Iface = Iface {
    name: "veth-web3",
    mac: [0x02, 0, 0, 0, 0x01, 0x04],
    uplink: false,
};
pub const HOST: Iface = Iface {
    name: "host",
    mac: [0x02, 0, 0, 0, 0, 0xff],
    uplink: false,
};

/// The router's MAC (192.168.50.1 and fd00:50::1): the next hop of every off-cluster
/// address.
pub const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
/// node-b's MAC (192.168.50.3): the next hop of pods 10.244.2.0/24.
pub const NODE_B_MAC: Mac = [0x02, 0, 0, 0, 0, 0xb3];

/// Something that sends or receives frames: its address, the MAC frames to it carry (its
/// own, or its next hop's), the node interface it sits behind, and the TTL it sends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub ip: IpAddr,
    pub mac: Mac,
    pub iface: Iface,
    /// TTL / hop limit of what it sends, as it arrives at node-a.
    pub ttl: u8,
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(core::net::Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    s.parse().expect("fixture address")
}

/// Pod `client` on veth-client.
pub const CLIENT: Peer = Peer {
    ip: v4(10, 244, 1, 2),
    mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x02],
    iface: VETH_CLIENT,
    ttl: 64,
};
/// Pod `web` on veth-web: the usual backend.
pub const WEB: Peer = Peer {
    ip: v4(10, 244, 1, 10),
    mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x0a],
    iface: VETH_WEB,
    ttl: 64,
};
pub const WEB2: Peer = Peer {
    ip: v4(10, 244, 1, 11),
    mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x0b],
    iface: VETH_WEB2,
    ttl: 64,
};
pub const WEB3: Peer = Peer {
    ip: v4(10, 244, 1, 12),
    mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x0c],
    iface: VETH_WEB3,
    ttl: 64,
};
/// A pod on node-b, reached through node-b over the uplink.
pub const REMOTE_POD: Peer = Peer {
    ip: v4(10, 244, 2, 20),
    mac: NODE_B_MAC,
    iface: ETH0,
    ttl: 63,
};
/// An external client, seven hops away, behind the router.
pub const EXTERNAL: Peer = Peer {
    ip: v4(203, 0, 113, 7),
    mac: ROUTER_MAC,
    iface: ETH0,
    ttl: 57,
};
/// Another external address, outside the LoadBalancer source ranges.
pub const OUTSIDER: Peer = Peer {
    ip: v4(198, 18, 0, 5),
    mac: ROUTER_MAC,
    iface: ETH0,
    ttl: 60,
};
/// A router on the path to the external client (sends ICMP errors).
pub const FAR_ROUTER: Peer = Peer {
    ip: v4(198, 18, 0, 1),
    mac: ROUTER_MAC,
    iface: ETH0,
    ttl: 62,
};
/// node-b itself.
pub const NODE_B: Peer = Peer {
    ip: v4(192, 168, 50, 3),
    mac: NODE_B_MAC,
    iface: ETH0,
    ttl: 64,
};
/// node-a's own stack (processes, hostNetwork pods).
pub const NODE_SELF: Peer = Peer {
    ip: NODE_IP,
    mac: HOST.mac,
    iface: HOST,
    ttl: 64,
};

/// node-a's addresses.
pub const NODE_IP: IpAddr = v4(192, 168, 50, 2);

pub fn node_ip6() -> IpAddr {
    v6("fd00:50::2")
}

pub fn client6() -> Peer {
    Peer {
        ip: v6("fd00:244::1:2"),
        ..CLIENT
    }
}

pub fn web6() -> Peer {
    Peer {
        ip: v6("fd00:244::1:a"),
        ..WEB
    }
}

pub fn external6() -> Peer {
    Peer {
        ip: v6("2001:db8::7"),
        ..EXTERNAL
    }
}

/// Parses an address literal (fixture constants only).
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("fixture address")
}
