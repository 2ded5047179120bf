//! Docker's plugin protocol for network and IPAM drivers: the JSON of
//! every call portless serves (names as in moby's
//! `libnetwork/drivers/remote/api/api.go` and
//! `libnetwork/ipams/remote/api/api.go`). Plain types, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Content type of every answer.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// An option Docker passes through untouched: strings, maps, anything.
pub type Options = BTreeMap<String, serde_json::Value>;

/// Every error, in Docker's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    #[serde(rename = "Err")]
    pub err: String,
}

/// `Plugin.Activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Activate {
    pub implements: Vec<String>,
}

/// `NetworkDriver.GetCapabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Capabilities {
    pub scope: String,
    pub connectivity_scope: String,
}

/// One address pool of a network, as the IPAM driver gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct IpamData {
    pub address_space: String,
    /// CIDR.
    pub pool: String,
    /// Address with prefix length (`10.30.1.1/24`).
    pub gateway: String,
    #[serde(rename = "AuxAddresses")]
    pub aux_addresses: Option<BTreeMap<String, String>>,
}

/// `NetworkDriver.CreateNetwork`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    pub options: Option<Options>,
    #[serde(rename = "IPv4Data")]
    pub ipv4_data: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data")]
    pub ipv6_data: Option<Vec<IpamData>>,
}

/// `NetworkDriver.DeleteNetwork`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeleteNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

/// An endpoint's interface, as Docker asks for it and as a driver answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointInterface {
    pub address: String,
    #[serde(rename = "AddressIPv6")]
    pub address_ipv6: String,
    pub mac_address: String,
}

/// `NetworkDriver.CreateEndpoint`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub interface: Option<EndpointInterface>,
    pub options: Option<Options>,
}

/// Answer to `NetworkDriver.CreateEndpoint`: no interface when Docker
/// gave the address itself (a driver may only fill in what is missing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpointResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<EndpointInterface>,
}

/// `NetworkDriver.DeleteEndpoint`, `.Leave`, `.EndpointOperInfo` and
/// `.RevokeExternalConnectivity`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

/// Answer to `NetworkDriver.EndpointOperInfo`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointInfo {
    pub value: Options,
}

/// `NetworkDriver.Join`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub sandbox_key: String,
    pub options: Option<Options>,
}

/// The interface Docker moves into the container and renames.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    pub src_name: String,
    pub dst_prefix: String,
}

/// A route for the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StaticRoute {
    pub destination: String,
    pub route_type: i32,
    pub next_hop: String,
}

/// Answer to `NetworkDriver.Join`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinResponse {
    pub interface_name: InterfaceName,
    pub gateway: String,
    #[serde(rename = "GatewayIPv6")]
    pub gateway_ipv6: String,
    pub static_routes: Vec<StaticRoute>,
    pub disable_gateway_service: bool,
}

/// `NetworkDriver.ProgramExternalConnectivity`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ProgramExternalConnectivity {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub options: Option<Options>,
}

/// The option of `ProgramExternalConnectivity` (and `CreateEndpoint`)
/// that lists the ports `docker run -p`/`-P` publishes: libnetwork's
/// `types.PortBinding`s, `{"Proto":6,"IP":"","Port":80,"HostIP":"",
/// "HostPort":8080,"HostPortEnd":8080}`.
pub const PORTMAP_OPTION: &str = "com.docker.network.portmap";

impl ProgramExternalConnectivity {
    /// The ports asked to be published, as `[HOST_IP:]HOST_PORT->PORT/PROTO`
    /// (any entry counts, even one not read).
    pub fn published_ports(&self) -> Vec<String> {
        let Some(list) = self
            .options
            .as_ref()
            .and_then(|o| o.get(PORTMAP_OPTION))
            .and_then(|v| v.as_array())
        else {
            return Vec::new();
        };
        list.iter()
            .map(|b| {
                let num = |k: &str| b.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
                let proto = match num("Proto") {
                    6 => "tcp".to_owned(),
                    17 => "udp".to_owned(),
                    132 => "sctp".to_owned(),
                    n => n.to_string(),
                };
                let host_ip = b
                    .get("HostIP")
                    .and_then(serde_json::Value::as_str)
                    .filter(|ip| !ip.is_empty())
                    .map(|ip| format!("{ip}:"))
                    .unwrap_or_default();
                let host_port = match num("HostPort") {
                    0 => "?".to_owned(),
                    p => p.to_string(),
                };
                format!("{host_ip}{host_port}->{}/{proto}", num("Port"))
            })
            .collect()
    }

    /// Why a portless network refuses this call, if it does: it publishes
    /// no ports (Docker shows this after "driver failed programming
    /// external connectivity on endpoint ...").
    pub fn refusal(&self) -> Option<String> {
        let ports = self.published_ports();
        (!ports.is_empty()).then(|| {
            format!(
                "portless networks do not publish ports (asked: {}): \
                 drop -p/-P and reach the container through portless's router \
                 (label it portless.http.host=NAME) or by its address from the \
                 network, or publish it from a Docker bridge network instead",
                ports.join(", ")
            )
        })
    }
}

/// `NetworkDriver.DiscoverNew` and `.DiscoverDelete`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Discovery {
    pub discovery_type: i64,
    pub discovery_data: serde_json::Value,
}

/// `IpamDriver.GetCapabilities`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamCapabilities {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    pub requires_request_replay: bool,
}

/// `IpamDriver.GetDefaultAddressSpaces`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressSpaces {
    pub local_default_address_space: String,
    pub global_default_address_space: String,
}

/// `IpamDriver.RequestPool`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestPool {
    pub address_space: String,
    pub pool: String,
    pub sub_pool: String,
    pub options: Option<BTreeMap<String, String>>,
    pub v6: bool,
}

/// Answer to `IpamDriver.RequestPool`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPoolResponse {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub pool: String,
    pub data: BTreeMap<String, String>,
}

/// `IpamDriver.ReleasePool`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReleasePool {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

/// `IpamDriver.RequestAddress`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
    pub options: Option<BTreeMap<String, String>>,
}

/// Answer to `IpamDriver.RequestAddress`: the address with its prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddressResponse {
    pub address: String,
    pub data: BTreeMap<String, String>,
}

/// `IpamDriver.ReleaseAddress`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
}

/// The option Docker sets on the gateway's address request.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
pub const GATEWAY_TYPE: &str = "com.docker.network.gateway";

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests as dockerd 20.10 sends them (captured from a real Engine
    /// through a socket of ours).
    #[test]
    fn docker_requests_parse() {
        let r: CreateNetwork = serde_json::from_str(
            r#"{"NetworkID":"4b2f","Options":{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{}},"IPv4Data":[{"AddressSpace":"portless","Gateway":"10.112.0.1/24","Pool":"10.112.0.0/24"}],"IPv6Data":[]}"#,
        )
        .unwrap();
        assert_eq!(r.network_id, "4b2f");
        let v4 = r.ipv4_data.unwrap();
        assert_eq!(v4[0].pool, "10.112.0.0/24");
        assert_eq!(v4[0].gateway, "10.112.0.1/24");
        let r: CreateEndpoint = serde_json::from_str(
            r#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":"10.112.0.2/24","AddressIPv6":"","MacAddress":""},"Options":{"com.docker.network.endpoint.exposedports":[],"com.docker.network.portmap":[]}}"#,
        )
        .unwrap();
        assert_eq!(r.interface.unwrap().address, "10.112.0.2/24");
        let r: RequestAddress = serde_json::from_str(
            r#"{"PoolID":"10.112.0.0-24","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
        )
        .unwrap();
        assert_eq!(
            r.options
                .unwrap()
                .get(REQUEST_ADDRESS_TYPE)
                .map(String::as_str),
            Some(GATEWAY_TYPE)
        );
        let r: RequestPool = serde_json::from_str(
            r#"{"AddressSpace":"portless","Pool":"","SubPool":"","Options":{},"V6":false}"#,
        )
        .unwrap();
        assert!(!r.v6);
        // ReleaseAddress names the address without its prefix.
        let r: ReleaseAddress =
            serde_json::from_str(r#"{"PoolID":"10.112.0.0-24","Address":"10.112.0.2"}"#).unwrap();
        assert_eq!(r.address, "10.112.0.2");
        let r: RequestAddress =
            serde_json::from_str(r#"{"PoolID":"10.112.0.0-24","Address":"","Options":null}"#)
                .unwrap();
        assert_eq!(r.options, None);
        // Docker leaves out what it does not set.
        let r: Join = serde_json::from_str(r#"{"NetworkID":"n","EndpointID":"e"}"#).unwrap();
        assert_eq!(r.sandbox_key, "");
    }

    #[test]
    fn published_ports_are_refused_with_what_to_do_instead() {
        let r: ProgramExternalConnectivity = serde_json::from_str(
            r#"{"NetworkID":"n","EndpointID":"e","Options":{"com.docker.network.endpoint.exposedports":[{"Proto":6,"Port":80}],"com.docker.network.portmap":[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080},{"Proto":17,"IP":"","Port":53,"HostIP":"127.0.0.1","HostPort":5353,"HostPortEnd":5353}]}}"#,
        )
        .unwrap();
        assert_eq!(
            r.published_ports(),
            ["8080->80/tcp", "127.0.0.1:5353->53/udp"]
        );
        let why = r.refusal().unwrap();
        assert!(
            why.starts_with(
                "portless networks do not publish ports (asked: 8080->80/tcp, 127.0.0.1:5353->53/udp)"
            ),
            "{why}"
        );
        assert!(why.contains("portless.http.host") && why.contains("Docker bridge network"));
        // Exposed ports alone (an image's EXPOSE), an empty map, or no
        // options at all: nothing is published, nothing refused.
        for body in [
            r#"{"NetworkID":"n","EndpointID":"e","Options":{"com.docker.network.endpoint.exposedports":[{"Proto":6,"Port":80}],"com.docker.network.portmap":[]}}"#,
            r#"{"NetworkID":"n","EndpointID":"e","Options":{"com.docker.network.portmap":null}}"#,
            r#"{"NetworkID":"n","EndpointID":"e"}"#,
        ] {
            let r: ProgramExternalConnectivity = serde_json::from_str(body).unwrap();
            assert_eq!(r.refusal(), None, "{body}");
        }
    }

    #[test]
    fn answers_have_docker_field_names() {
        let j = serde_json::to_value(JoinResponse {
            interface_name: InterfaceName {
                src_name: "pn-c1".into(),
                dst_prefix: "eth".into(),
            },
            gateway: "10.112.0.1".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(j["InterfaceName"]["SrcName"], "pn-c1");
        assert_eq!(j["InterfaceName"]["DstPrefix"], "eth");
        assert_eq!(j["Gateway"], "10.112.0.1");
        assert!(j.get("GatewayIPv6").is_some());
        let j = serde_json::to_value(RequestPoolResponse {
            pool_id: "p".into(),
            pool: "10.112.0.0/24".into(),
            data: BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(j["PoolID"], "p");
        let j = serde_json::to_value(IpamCapabilities::default()).unwrap();
        assert_eq!(j["RequiresMACAddress"], false);
        let j = serde_json::to_value(CreateEndpointResponse::default()).unwrap();
        assert_eq!(j, serde_json::json!({}));
        let j = serde_json::to_value(ErrorResponse { err: "x".into() }).unwrap();
        assert_eq!(j, serde_json::json!({"Err": "x"}));
        let j = serde_json::to_value(Capabilities {
            scope: "local".into(),
            connectivity_scope: "global".into(),
        })
        .unwrap();
        assert_eq!(j["Scope"], "local");
    }
}
