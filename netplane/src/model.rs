//! Plain domain types shared by the planner, the store and the executor.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// How this host carries traffic to its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Kernel VXLAN to every peer.
    Vxlan,
    /// Plain routes via each peer's underlay address; every peer must sit on
    /// a directly connected segment.
    Route,
    /// Plain routes to peers on a directly connected segment, VXLAN to the
    /// rest.
    Auto,
}

impl Mode {
    /// Whether a host in this mode runs a VXLAN device that peers may send to.
    pub fn has_vxlan(self) -> bool {
        !matches!(self, Mode::Route)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Vxlan => "vxlan",
            Mode::Route => "route",
            Mode::Auto => "auto",
        })
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vxlan" => Ok(Mode::Vxlan),
            "route" => Ok(Mode::Route),
            "auto" => Ok(Mode::Auto),
            other => Err(format!(
                "unknown mode `{other}`: expected vxlan, route or auto"
            )),
        }
    }
}

/// The transport actually used towards one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Vxlan,
    Route,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Vxlan => "vxlan",
            Transport::Route => "route",
        })
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The VTEP address of a host: locally administered, unicast, and derived
    /// from the underlay address so that it survives restarts and is unique
    /// wherever underlay addresses are.
    pub fn for_vtep(underlay: Ipv4Addr) -> Mac {
        let o = underlay.octets();
        Mac([0x0e, 0x70, o[0], o[1], o[2], o[3]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| format!("bad MAC `{s}`"))?;
            if part.len() != 2 {
                return Err(format!("bad MAC `{s}`"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("bad MAC `{s}`"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC `{s}`"));
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a host publishes about itself in etcd, and what every other host
/// reads to program its kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostRecord {
    /// Stable identity of the host: its advertise address unless configured.
    pub id: String,
    pub subnet: Ipv4Net,
    /// Underlay address: VXLAN packets and routed packets go there.
    pub underlay: Ipv4Addr,
    /// MAC of the host's VXLAN device (meaningless in route mode).
    pub vtep_mac: Mac,
    pub mode: Mode,
    /// VXLAN UDP port this host listens on.
    pub vxlan_port: u16,
    /// Free text for people: the host name.
    #[serde(default)]
    pub hostname: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let m = Mac::for_vtep(Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(m.to_string(), "0e:70:0a:01:02:03");
        assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        assert!("0e:70:0a:01:02".parse::<Mac>().is_err());
        assert!("0e:70:0a:01:02:03:04".parse::<Mac>().is_err());
        assert!("zz:70:0a:01:02:03".parse::<Mac>().is_err());
    }

    #[test]
    fn host_record_json_round_trips() {
        let r = HostRecord {
            id: "192.0.2.1".into(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            underlay: Ipv4Addr::new(192, 0, 2, 1),
            vtep_mac: Mac::for_vtep(Ipv4Addr::new(192, 0, 2, 1)),
            mode: Mode::Auto,
            vxlan_port: 4789,
            hostname: "h1".into(),
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"vtep-mac\":\"0e:70:c0:00:02:01\""), "{j}");
        assert_eq!(serde_json::from_str::<HostRecord>(&j).unwrap(), r);
    }
}
