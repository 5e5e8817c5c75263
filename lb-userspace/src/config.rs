//! Configuration: flags, environment, config file, and how they stack.
//!
//! Every setting has a flag, an environment variable and a config-file key. Precedence, lowest
//! first: built-in default < config file (`--config` / `XLB_CONFIG`) < environment < flag.
//!
//! How the layers are built on clap: [`Args`] declares each flag with its env var and default
//! (so `xlb --help` shows both). [`Config::load`] reads the config file and the environment
//! itself and hands the winning value of the two to clap as that flag's default, after
//! switching off clap's own env lookup; clap then lets a flag on the command line win over it.
//! The environment is passed in as a function, which keeps tests independent of the process
//! environment. An empty environment variable counts as unset.
//!
//! The config file is YAML (so JSON too): a mapping from key to value, where a key is the
//! long flag name (`restricted-cidr`), with `_` accepted for `-` and any case, so the original
//! environment names work as keys too (`RESTRICTED_CIDR`). A list value is joined with commas.
//!
//! [`Args`] is what clap parses; [`Config`] is the resolved, validated, plain data the rest of
//! xlb takes.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

use lb_common::{SNAT_PORTS_MIN_COUNT, SnatPorts};

use crate::pool::{Pool, PoolError};

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "XLB_CONFIG";

/// Second spellings of environment variables: `(primary, alias)`. The primary wins if both
/// are set.
const ENV_ALIASES: &[(&str, &str)] = &[("LINKDEVICE", "LINK_DEVICE")];

/// Errors that stop xlb from starting: each names the bad value and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Bad command line, or `--help`/`--version` (call [`clap::Error::exit`] to print it).
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not a YAML mapping of keys to scalars or lists of scalars.
    #[error("config file {path} is not valid: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// The config file has a key that is no flag.
    #[error("config file {path}: unknown key {key:?}; keys are the long flag names: {known}")]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
    /// A value is not valid for its setting. `origin` names the flag, env var or file key.
    #[error("{origin}: {value:?} {reason}")]
    Invalid {
        origin: String,
        value: String,
        reason: String,
    },
}

/// Which address of a Node is used as a backend address out of cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAddressType {
    InternalIp,
    ExternalIp,
}

impl NodeAddressType {
    /// The `status.addresses[].type` this stands for.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeAddressType::InternalIp => "InternalIP",
            NodeAddressType::ExternalIp => "ExternalIP",
        }
    }
}

impl FromStr for NodeAddressType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "InternalIP" => Ok(NodeAddressType::InternalIp),
            "ExternalIP" => Ok(NodeAddressType::ExternalIp),
            "Hostname" | "InternalDNS" | "ExternalDNS" => Err(format!(
                "{text} is not an IP address, and backends need one; use InternalIP or ExternalIP"
            )),
            _ => Err("is not a node address type; use InternalIP or ExternalIP".to_owned()),
        }
    }
}

/// `status.loadBalancer.ingress[].ipMode` written for each Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IpMode {
    /// Traffic arrives with the VIP as destination (nodes may short-cut it).
    Vip,
    /// Traffic must go through the load balancer.
    Proxy,
}

impl IpMode {
    /// The value as the Kubernetes API spells it.
    pub fn as_api_str(self) -> &'static str {
        match self {
            IpMode::Vip => "VIP",
            IpMode::Proxy => "Proxy",
        }
    }
}

/// How the network learns that VIP traffic goes to this node (`--announce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Announce {
    /// On the link device, with the mask of its prefix; neighbours find VIPs by ARP, and xlb
    /// sends gratuitous ARP when it adds or adopts one.
    #[default]
    Link,
    /// On the loopback device as /32, for a routing daemon (FRR, BIRD) to advertise over BGP or
    /// OSPF on a routed fabric. No ARP.
    Lo,
}

/// Which data planes carry the traffic (`--dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum DataplaneKind {
    /// The XDP program only; flows it passes to the kernel find no listener.
    Xdp,
    /// The userspace TCP/UDP proxy only, no BPF at all: for hosts where XDP cannot load.
    Proxy,
    /// XDP for the fast path and the proxy on the same VIP:port for what XDP passes to the
    /// kernel; if XDP cannot load or attach, the proxy alone, with a warning.
    #[default]
    Both,
}

/// The command line of `xlb`, as clap parses it. Build a [`Config`] with [`Config::load`].
#[derive(Debug, Clone, Parser)]
#[command(
    name = "xlb",
    version,
    about = "Kubernetes LoadBalancer Services on bare metal, with XDP",
    long_about = "Kubernetes LoadBalancer Services on bare metal, with XDP.\n\n\
        Every flag can also be set by its environment variable or by its long name as a key \
        in the YAML file given by --config. Precedence: flag > environment > config file > default."
)]
pub struct Args {
    /// YAML config file whose keys are the long flag names.
    #[arg(long, env = "XLB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// kubeconfig file [default: in-cluster config, then ~/.kube/config].
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Device to attach XDP to and put VIPs on (env LINK_DEVICE also works)
    /// [default: the device of the default route].
    #[arg(
        long = "linkdevice",
        visible_alias = "link-device",
        env = "LINKDEVICE",
        value_name = "DEVICE"
    )]
    pub link_device: Option<String>,

    /// Debug logging.
    #[arg(long, env = "DEBUG", value_parser = clap::builder::BoolishValueParser::new())]
    pub debug: bool,

    /// In-cluster mode: balance over pod endpoints (EndpointSlices) instead of NodePorts.
    #[arg(long, env = "KUBERNETES", value_parser = clap::builder::BoolishValueParser::new())]
    pub kubernetes: bool,

    /// Address pool: CIDRs and ranges (a.b.c.d-e.f.g.h), comma separated [default: none, only
    /// explicit requests within the link device's subnet are served].
    #[arg(long, env = "RESTRICTED_CIDR", value_name = "CIDRS")]
    pub restricted_cidr: Option<String>,

    /// Label nodes that lack the worker label and are not control-plane nodes
    /// (node-role.kubernetes.io/control-plane or /master) with it, so they become backends.
    #[arg(long, env = "TAG_WORKER_NODES", value_parser = clap::builder::BoolishValueParser::new())]
    pub tag_worker_nodes: bool,

    /// The loadBalancerClass to serve [default: Services without a class].
    #[arg(long, env = "XLB_LB_CLASS", value_name = "CLASS")]
    pub lb_class: Option<String>,

    /// Read Services, EndpointSlices and Nodes from manifests in this directory instead of
    /// from Kubernetes.
    #[arg(long, env = "XLB_MANIFESTS", value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// Only nodes with this label (`key` or `key=value`) are backends; empty for all nodes.
    #[arg(
        long,
        env = "XLB_WORKER_LABEL",
        default_value = "node-role.kubernetes.io/worker"
    )]
    pub worker_label: String,

    /// Node address used for backends: InternalIP or ExternalIP.
    #[arg(
        long,
        env = "XLB_NODE_ADDRESS_TYPE",
        default_value = "InternalIP",
        value_parser = NodeAddressType::from_str
    )]
    pub node_address_type: NodeAddressType,

    /// This node's name: with the Kubernetes API, xlb instances on several LB nodes coordinate
    /// through Leases under this name (README, "Several LB nodes"); also for
    /// --announce-local-only.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Namespace of the Leases the LB nodes coordinate with.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,

    /// How often each instance renews its Leases (e.g. 500ms, 1s).
    #[arg(long, env = "XLB_LEASE_RENEW", default_value = "500ms", value_parser = parse_duration)]
    pub lease_renew: Duration,

    /// How long a Lease holds without renewal (e.g. 2s).
    #[arg(long, env = "XLB_LEASE_DURATION", default_value = "2s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// ipMode written in the Service status.
    #[arg(long, env = "XLB_IP_MODE", value_enum, default_value = "vip")]
    pub ip_mode: IpMode,

    /// Also write the allocated IP to the Service's spec.externalIPs.
    #[arg(long, env = "XLB_UPDATE_EXTERNAL_IPS", value_parser = clap::builder::BoolishValueParser::new())]
    pub update_external_ips: bool,

    /// On exit, leave VIPs and Service status in place.
    #[arg(long, env = "XLB_KEEP_ON_EXIT", value_parser = clap::builder::BoolishValueParser::new())]
    pub keep_on_exit: bool,

    /// On exit, also remove the pinned BPF maps and programs.
    #[arg(long, env = "XLB_CLEANUP", value_parser = clap::builder::BoolishValueParser::new())]
    pub cleanup: bool,

    /// Where VIPs go: on the link device, or on lo as /32.
    #[arg(long, env = "XLB_ANNOUNCE", value_enum, default_value = "link")]
    pub announce: Announce,

    /// Announce a VIP only while this node hosts a ready endpoint of its Service.
    #[arg(long, env = "XLB_ANNOUNCE_LOCAL_ONLY", value_parser = clap::builder::BoolishValueParser::new())]
    pub announce_local_only: bool,

    /// XDP attach mode.
    #[arg(long, env = "XLB_XDP_MODE", value_enum, default_value = "auto")]
    pub xdp_mode: XdpMode,

    /// Data plane: xdp, proxy (userspace TCP/UDP proxy, no BPF), or both (XDP fast path, proxy
    /// for the flows XDP passes to the kernel).
    #[arg(long, env = "XLB_DATAPLANE", value_enum, default_value = "both")]
    pub dataplane: DataplaneKind,

    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "XLB_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: SocketAddr,

    /// Directory where BPF maps and programs are pinned.
    #[arg(
        long,
        env = "XLB_PIN_DIR",
        default_value = "/sys/fs/bpf/xlb",
        value_name = "DIR"
    )]
    pub pin_dir: PathBuf,

    /// Source ports of translated flows (XDP): FIRST-LAST, at least 1024 ports, per SNAT
    /// address and backend. xlb reserves them from the host's own connections
    /// (net.ipv4.ip_local_reserved_ports) and refuses a range that leaves the kernel fewer
    /// than 4096 ephemeral ports (net.ipv4.ip_local_port_range).
    #[arg(
        long,
        env = "XLB_SNAT_PORTS",
        default_value = "1024-32767",
        value_name = "FIRST-LAST",
        value_parser = parse_snat_ports
    )]
    pub snat_ports: SnatPorts,

    /// Extra SNAT source addresses of this LB node, comma separated (at most 7 per subnet):
    /// new XDP flows take their ports across these and the LB's own address toward the
    /// backends. Each must be a free address on that subnet; xlb adds it to the device.
    #[arg(long, env = "XLB_SNAT_ADDRESSES", value_name = "IPS")]
    pub snat_addresses: Option<String>,
}

/// Where the kubeconfig comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeconfigSource {
    /// In-cluster service account if present, then `~/.kube/config`.
    Infer,
    /// This file (`--kubeconfig` / `KUBECONFIG`).
    File(PathBuf),
}

/// Which XDP mode to attach in (`--xdp-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum XdpMode {
    /// Per device: native (driver) XDP where the driver takes it; TC ingress on a veth and,
    /// with a log line, where native XDP fails (faster there, see `XdpDataplane::attach`).
    #[default]
    Auto,
    /// Native (driver) XDP only.
    Native,
    /// Generic (skb) XDP only.
    Skb,
    /// TC ingress (TCX) only.
    Tc,
}

/// A node label selector: `key`, or `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelFilter {
    pub key: String,
    /// `None` matches any value.
    pub value: Option<String>,
}

/// The resolved configuration: plain, validated data.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub kubeconfig: KubeconfigSource,
    /// `None`: use the device of the default route.
    pub link_device: Option<String>,
    pub debug: bool,
    /// `KUBERNETES=true`: pod endpoints for every Service.
    pub in_cluster: bool,
    /// The address pool; empty when `RESTRICTED_CIDR` is unset.
    pub pool: Pool,
    pub tag_worker_nodes: bool,
    /// `None`: serve Services without a `loadBalancerClass`.
    pub lb_class: Option<String>,
    /// `Some`: read manifests from this directory instead of Kubernetes.
    pub manifests: Option<PathBuf>,
    /// `None`: every Ready node is a backend.
    pub worker_label: Option<LabelFilter>,
    pub node_address_type: NodeAddressType,
    pub node_name: Option<String>,
    /// Namespace of the coordination Leases.
    pub lease_namespace: String,
    pub lease_renew: Duration,
    pub lease_duration: Duration,
    pub ip_mode: IpMode,
    pub update_external_ips: bool,
    pub keep_on_exit: bool,
    pub cleanup: bool,
    pub announce: Announce,
    pub announce_local_only: bool,
    pub xdp_mode: XdpMode,
    pub dataplane: DataplaneKind,
    pub metrics_addr: SocketAddr,
    pub pin_dir: PathBuf,
    /// The SNAT port range of the XDP data plane.
    pub snat_ports: SnatPorts,
    /// Extra SNAT addresses of the XDP data plane.
    pub snat_addresses: Vec<Ipv4Addr>,
}

impl Default for Config {
    /// The built-in defaults: what `xlb` with no flags, no environment and no file means.
    fn default() -> Self {
        Config::load(["xlb"], &|_| None).expect("the built-in defaults are a valid configuration")
    }
}

/// Values from the config file or the environment that were handed to clap as defaults, by
/// argument id, with a description of where each came from.
type Layered = BTreeMap<String, (String, String)>;

impl Config {
    /// Parses `argv` (with the program name first), the config file and the environment (read
    /// through `env`; pass `|name| std::env::var(name).ok()` in `main`) into a `Config`.
    ///
    /// `--help` and `--version` come back as [`ConfigError::Args`]: `main` should call
    /// `error.exit()` on that variant, which prints them (or a usage error) and exits.
    pub fn load<I, T>(argv: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let env = |name: &str| env(name).filter(|value| !value.is_empty());
        if wants_help(&argv) {
            // Parse with clap's own env lookup so that the help shows env vars and values.
            Args::command().try_get_matches_from(&argv)?;
        }
        let file = match config_path(&argv, &env) {
            Some(path) => read_config_file(&path)?,
            None => ConfigFile::default(),
        };
        let mut layered = Layered::new();
        let command = Args::command().mut_args(|arg| {
            let names = env_names(&arg);
            let arg = arg.env(None);
            let id = arg.get_id().to_string();
            let from_env = names.into_iter().find_map(|name| Some((env(&name)?, name)));
            let from_file = || {
                let key = file.values.keys().find(|key| arg_has_key(&arg, key))?;
                Some((
                    file.values[key].clone(),
                    format!("{key} in {}", file.path.display()),
                ))
            };
            match from_env.or_else(from_file) {
                Some((value, origin)) => {
                    layered.insert(id, (value.clone(), origin));
                    arg.default_value(value)
                }
                None => arg,
            }
        });
        if let Some(key) = file
            .values
            .keys()
            .find(|key| !command_has_key(&command, key))
        {
            return Err(ConfigError::UnknownKey {
                path: file.path.clone(),
                key: key.clone(),
                known: command_keys(&command).join(", "),
            });
        }
        let matches = command
            .try_get_matches_from(argv)
            .map_err(|error| name_origin(error, &layered))?;
        let args = Args::from_arg_matches(&matches)?;
        Config::resolve(args, &|id| origin(&matches, &layered, id))
    }

    /// Validates `args` into a `Config`; `origin` names where a value came from, for errors.
    fn resolve(args: Args, origin: &dyn Fn(&str) -> String) -> Result<Config, ConfigError> {
        let pool = match &args.restricted_cidr {
            Some(text) => text.parse::<Pool>().map_err(|error| ConfigError::Invalid {
                origin: origin("restricted_cidr"),
                value: match error {
                    PoolError::BadEntry(entry) => entry,
                },
                reason: "is not a CIDR or range".to_owned(),
            })?,
            None => Pool::default(),
        };
        let worker_label = match args.worker_label.trim() {
            "" => None,
            label => {
                let (key, value) = match label.split_once('=') {
                    Some((key, value)) => (key.trim(), Some(value.trim().to_owned())),
                    None => (label, None),
                };
                if key.is_empty() {
                    return Err(ConfigError::Invalid {
                        origin: origin("worker_label"),
                        value: args.worker_label.clone(),
                        reason: "has no label key; write `key` or `key=value`".to_owned(),
                    });
                }
                Some(LabelFilter {
                    key: key.to_owned(),
                    value,
                })
            }
        };
        if args.lease_renew >= args.lease_duration {
            return Err(ConfigError::Invalid {
                origin: origin("lease_renew"),
                value: format!("{:?}", args.lease_renew),
                reason: format!(
                    "must be shorter than --lease-duration ({:?}), or Leases expire between renewals",
                    args.lease_duration
                ),
            });
        }
        if args.announce_local_only && args.announce != Announce::Lo {
            return Err(ConfigError::Invalid {
                origin: origin("announce_local_only"),
                value: "true".to_owned(),
                reason: "needs --announce lo: on a shared L2 link one node must answer for a VIP whether or not it hosts an endpoint".to_owned(),
            });
        }
        let mut snat_addresses = Vec::new();
        for item in args.snat_addresses.iter().flat_map(|list| list.split(',')) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let ip: Ipv4Addr = item.parse().map_err(|_| ConfigError::Invalid {
                origin: origin("snat_addresses"),
                value: item.to_owned(),
                reason: "is not an IPv4 address".to_owned(),
            })?;
            if !snat_addresses.contains(&ip) {
                snat_addresses.push(ip);
            }
        }
        let non_empty = |value: Option<String>| value.filter(|value| !value.trim().is_empty());
        Ok(Config {
            kubeconfig: match args.kubeconfig {
                Some(path) if !path.as_os_str().is_empty() => KubeconfigSource::File(path),
                _ => KubeconfigSource::Infer,
            },
            link_device: non_empty(args.link_device),
            debug: args.debug,
            in_cluster: args.kubernetes,
            pool,
            tag_worker_nodes: args.tag_worker_nodes,
            lb_class: non_empty(args.lb_class),
            manifests: args.manifests,
            worker_label,
            node_address_type: args.node_address_type,
            node_name: non_empty(args.node_name),
            lease_namespace: args.lease_namespace,
            lease_renew: args.lease_renew,
            lease_duration: args.lease_duration,
            ip_mode: args.ip_mode,
            update_external_ips: args.update_external_ips,
            keep_on_exit: args.keep_on_exit,
            cleanup: args.cleanup,
            announce: args.announce,
            announce_local_only: args.announce_local_only,
            xdp_mode: args.xdp_mode,
            dataplane: args.dataplane,
            metrics_addr: args.metrics_addr,
            pin_dir: args.pin_dir,
            snat_ports: args.snat_ports,
            snat_addresses,
        })
    }
}

/// Parses a SNAT port range `FIRST-LAST`.
fn parse_snat_ports(text: &str) -> Result<SnatPorts, String> {
    let ports = text.split_once('-').and_then(|(first, last)| {
        Some((
            first.trim().parse::<u16>().ok()?,
            last.trim().parse::<u16>().ok()?,
        ))
    });
    match ports {
        Some((first, last)) if first >= 1024 => SnatPorts::new(first, last).ok_or_else(|| {
            format!("must hold at least {SNAT_PORTS_MIN_COUNT} ports, FIRST before LAST")
        }),
        Some(_) => Err("must start at 1024 or above (ports below are privileged)".to_owned()),
        None => Err("is not a port range FIRST-LAST (e.g. 1024-32767)".to_owned()),
    }
}

/// Parses `500ms`, `2s` or `1.5s` (a number and the unit `ms` or `s`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(number) = text.strip_suffix("ms") {
        (number, 0.001)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1.0)
    } else {
        return Err("needs a unit: ms or s (e.g. 500ms, 2s)".to_owned());
    };
    match number.trim().parse::<f64>() {
        Ok(value) if value > 0.0 && value.is_finite() && value * scale <= 3600.0 => {
            Ok(Duration::from_secs_f64(value * scale))
        }
        _ => Err("is not a positive duration of at most an hour (e.g. 500ms, 2s)".to_owned()),
    }
}

/// True when the command line asks for help or the version: those are printed by clap as
/// they are, without reading the config file.
fn wants_help(argv: &[OsString]) -> bool {
    argv.iter().skip(1).any(|arg| {
        ["-h", "--help", "-V", "--version"]
            .iter()
            .any(|flag| arg == flag)
    })
}

/// The config file named by `--config FILE`, `--config=FILE` or `XLB_CONFIG`.
fn config_path(argv: &[OsString], env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.to_str().and_then(|arg| arg.strip_prefix("--config=")) {
            return Some(PathBuf::from(path));
        }
    }
    env(CONFIG_ENV).map(PathBuf::from)
}

/// The config file's values, as strings keyed by the keys as written.
#[derive(Debug, Default)]
struct ConfigFile {
    path: PathBuf,
    values: BTreeMap<String, String>,
}

fn read_config_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| ConfigError::BadFile {
        path: path.to_owned(),
        reason,
    };
    let document: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|error| bad(error.to_string()))?;
    let mapping = match document {
        serde_yaml::Value::Null => {
            return Ok(ConfigFile {
                path: path.to_owned(),
                ..Default::default()
            });
        }
        serde_yaml::Value::Mapping(mapping) => mapping,
        _ => {
            return Err(bad(
                "the top level must be a mapping of keys to values".to_owned()
            ));
        }
    };
    let mut values = BTreeMap::new();
    for (key, value) in mapping {
        let serde_yaml::Value::String(key) = key else {
            return Err(bad(format!("key {key:?} is not a string")));
        };
        let value = match value {
            serde_yaml::Value::Null => continue,
            serde_yaml::Value::Sequence(items) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .map(|items| items.join(",")),
            value => scalar(&value),
        }
        .ok_or_else(|| {
            bad(format!(
                "the value of {key:?} must be a scalar or a list of scalars"
            ))
        })?;
        values.insert(key, value);
    }
    Ok(ConfigFile {
        path: path.to_owned(),
        values,
    })
}

fn scalar(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::Bool(value) => Some(value.to_string()),
        serde_yaml::Value::Number(value) => Some(value.to_string()),
        serde_yaml::Value::String(value) => Some(value.clone()),
        _ => None,
    }
}

/// The environment variables that set `arg`, primary first.
fn env_names(arg: &clap::Arg) -> Vec<String> {
    let Some(primary) = arg
        .get_env()
        .map(|name| name.to_string_lossy().into_owned())
    else {
        return Vec::new();
    };
    let aliases = ENV_ALIASES
        .iter()
        .filter(|(name, _)| *name == primary)
        .map(|(_, alias)| (*alias).to_owned());
    std::iter::once(primary.clone()).chain(aliases).collect()
}

/// Flags that cannot be set in the config file.
const NOT_FILE_KEYS: &[&str] = &["config", "help", "version"];

/// Config-file keys are long flag names (or aliases); `_` counts as `-`, case is ignored.
fn arg_has_key(arg: &clap::Arg, key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('_', "-");
    !NOT_FILE_KEYS.contains(&key.as_str())
        && arg
            .get_long_and_visible_aliases()
            .is_some_and(|longs| longs.contains(&key.as_str()))
}

fn command_has_key(command: &clap::Command, key: &str) -> bool {
    command.get_arguments().any(|arg| arg_has_key(arg, key))
}

fn command_keys(command: &clap::Command) -> Vec<&str> {
    command
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|long| !NOT_FILE_KEYS.contains(long))
        .collect()
}

/// Where the value of argument `id` came from: the flag, or the env var / file key it was
/// layered from.
fn origin(matches: &ArgMatches, layered: &Layered, id: &str) -> String {
    match (matches.value_source(id), layered.get(id)) {
        (Some(ValueSource::DefaultValue), Some((_, origin))) => origin.clone(),
        (Some(ValueSource::DefaultValue), None) => format!("default of --{}", id.replace('_', "-")),
        _ => format!("--{}", id.replace('_', "-")),
    }
}

/// Turns clap's "invalid value" error about a value that came from the environment or the
/// config file into one that names that origin (clap would name the flag).
fn name_origin(error: clap::Error, layered: &Layered) -> ConfigError {
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return ConfigError::Args(error);
    }
    let context = |kind| match error.get(kind) {
        Some(ContextValue::String(text)) => Some(text.clone()),
        _ => None,
    };
    let (Some(flag), Some(value)) = (
        context(ContextKind::InvalidArg),
        context(ContextKind::InvalidValue),
    ) else {
        return ConfigError::Args(error);
    };
    let found = layered.iter().find(|(id, (layered_value, _))| {
        let long = format!("--{}", id.replace('_', "-"));
        *layered_value == value && (flag == long || flag.starts_with(&format!("{long} ")))
    });
    let Some((_, (_, origin))) = found else {
        return ConfigError::Args(error);
    };
    let reason = error
        .source()
        .map(|source| source.to_string())
        .or_else(|| match error.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(valid)) => Some(format!("use one of: {}", valid.join(", "))),
            _ => None,
        })
        .unwrap_or_else(|| "is not valid".to_owned());
    ConfigError::Invalid {
        origin: origin.clone(),
        value,
        reason: if reason.starts_with("is ") {
            reason
        } else {
            format!("is not valid: {reason}")
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write as _;

    use super::*;

    fn load(argv: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load(
            std::iter::once("xlb").chain(argv.iter().copied()),
            &move |name| env.get(name).cloned(),
        )
    }

    fn ok(argv: &[&str], env: &[(&str, &str)]) -> Config {
        load(argv, env).unwrap_or_else(|error| panic!("{argv:?} {env:?} should load: {error}"))
    }

    fn err(argv: &[&str], env: &[(&str, &str)]) -> String {
        match load(argv, env) {
            Ok(config) => panic!("{argv:?} {env:?} should be refused, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("create a temporary config file");
        file.write_all(text.as_bytes())
            .expect("write the config file");
        file
    }

    fn path(file: &tempfile::NamedTempFile) -> &str {
        file.path().to_str().expect("temporary paths are UTF-8")
    }

    #[test]
    fn defaults() {
        let config = Config::default();
        assert_eq!(config.kubeconfig, KubeconfigSource::Infer);
        assert_eq!(config.link_device, None);
        assert!(!config.debug && !config.in_cluster && !config.tag_worker_nodes);
        assert!(config.pool.is_empty());
        assert_eq!(config.lb_class, None);
        assert_eq!(config.manifests, None);
        assert_eq!(
            config.worker_label,
            Some(LabelFilter {
                key: "node-role.kubernetes.io/worker".to_owned(),
                value: None
            })
        );
        assert_eq!(config.node_address_type, NodeAddressType::InternalIp);
        assert_eq!(config.ip_mode, IpMode::Vip);
        assert_eq!(config.announce, Announce::Link);
        assert_eq!(config.xdp_mode, XdpMode::Auto);
        assert_eq!(config.dataplane, DataplaneKind::Both);
        assert_eq!(
            config.metrics_addr,
            "0.0.0.0:9464".parse().expect("literal")
        );
        assert_eq!(config.pin_dir, PathBuf::from("/sys/fs/bpf/xlb"));
        assert!(!config.update_external_ips && !config.keep_on_exit && !config.cleanup);
        assert!(!config.announce_local_only);
        assert_eq!(config.node_name, None);
    }

    #[test]
    fn config_file_overrides_defaults() {
        let file = config_file(
            "restricted-cidr: [198.51.100.0/24, 203.0.113.1-203.0.113.9]\n\
             ip_mode: proxy\nDEBUG: true\nworker-label: ''\nmetrics-addr: 127.0.0.1:9000\n",
        );
        let config = ok(&["--config", path(&file)], &[]);
        assert!(
            config
                .pool
                .contains("203.0.113.5".parse().expect("literal"))
        );
        assert_eq!(config.ip_mode, IpMode::Proxy);
        assert!(config.debug);
        assert_eq!(config.worker_label, None);
        assert_eq!(
            config.metrics_addr,
            "127.0.0.1:9000".parse().expect("literal")
        );
        // The file can also be named by XLB_CONFIG.
        let config = ok(&[], &[("XLB_CONFIG", path(&file))]);
        assert_eq!(config.ip_mode, IpMode::Proxy);
    }

    #[test]
    fn environment_overrides_config_file() {
        let file = config_file("ip-mode: proxy\ndebug: true\nlinkdevice: eth0\n");
        let config = ok(
            &["--config", path(&file)],
            &[
                ("XLB_IP_MODE", "vip"),
                ("DEBUG", "false"),
                ("LINKDEVICE", "eth1"),
            ],
        );
        assert_eq!(config.ip_mode, IpMode::Vip);
        assert!(!config.debug);
        assert_eq!(config.link_device.as_deref(), Some("eth1"));
    }

    #[test]
    fn flags_override_environment() {
        let config = ok(
            &[
                "--ip-mode",
                "proxy",
                "--debug",
                "--linkdevice=eth2",
                "--restricted-cidr",
                "10.0.0.0/8",
            ],
            &[
                ("XLB_IP_MODE", "vip"),
                ("DEBUG", "0"),
                ("LINKDEVICE", "eth1"),
                ("RESTRICTED_CIDR", "10.0.0.0/33"),
            ],
        );
        assert_eq!(config.ip_mode, IpMode::Proxy);
        assert!(config.debug);
        assert_eq!(config.link_device.as_deref(), Some("eth2"));
        // The bad RESTRICTED_CIDR is overridden by the flag, so it is not an error.
        assert!(config.pool.contains("10.1.2.3".parse().expect("literal")));
    }

    #[test]
    fn flags_override_config_file() {
        let file = config_file("xdp-mode: native\n");
        let config = ok(&["--config", path(&file), "--xdp-mode", "skb"], &[]);
        assert_eq!(config.xdp_mode, XdpMode::Skb);
    }

    #[test]
    fn dataplane_is_chosen_by_flag_environment_or_file() {
        assert_eq!(
            ok(&["--dataplane", "proxy"], &[]).dataplane,
            DataplaneKind::Proxy
        );
        assert_eq!(
            ok(&[], &[("XLB_DATAPLANE", "xdp")]).dataplane,
            DataplaneKind::Xdp
        );
        let file = config_file("dataplane: proxy\n");
        assert_eq!(
            ok(&["--config", path(&file)], &[]).dataplane,
            DataplaneKind::Proxy
        );
        assert_eq!(
            ok(
                &["--config", path(&file), "--dataplane", "both"],
                &[("XLB_DATAPLANE", "xdp")]
            )
            .dataplane,
            DataplaneKind::Both
        );
        let message = err(&[], &[("XLB_DATAPLANE", "ipvs")]);
        assert!(
            message.starts_with(r#"XLB_DATAPLANE: "ipvs" is not valid"#)
                && message.contains("proxy"),
            "{message}"
        );
    }

    #[test]
    fn both_spellings_of_the_link_device_work() {
        for (argv, env) in [
            (vec!["--linkdevice", "eth9"], vec![]),
            (vec!["--link-device", "eth9"], vec![]),
            (vec![], vec![("LINKDEVICE", "eth9")]),
            (vec![], vec![("LINK_DEVICE", "eth9")]),
            (
                vec![],
                vec![("LINKDEVICE", "eth9"), ("LINK_DEVICE", "eth0")],
            ),
        ] {
            assert_eq!(
                ok(&argv, &env).link_device.as_deref(),
                Some("eth9"),
                "{argv:?} {env:?}"
            );
        }
        for key in [
            "linkdevice",
            "link-device",
            "link_device",
            "LINK_DEVICE",
            "LINKDEVICE",
        ] {
            let file = config_file(&format!("{key}: eth9\n"));
            assert_eq!(
                ok(&["--config", path(&file)], &[]).link_device.as_deref(),
                Some("eth9"),
                "config key {key}"
            );
        }
    }

    #[test]
    fn original_environment_names_work() {
        let config = ok(
            &[],
            &[
                ("KUBECONFIG", "/etc/kube.conf"),
                ("DEBUG", "true"),
                ("KUBERNETES", "1"),
                (
                    "RESTRICTED_CIDR",
                    "198.51.100.10-198.51.100.20,203.0.113.0/28",
                ),
                ("TAG_WORKER_NODES", "yes"),
                ("NODE_NAME", "node1"),
            ],
        );
        assert_eq!(
            config.kubeconfig,
            KubeconfigSource::File("/etc/kube.conf".into())
        );
        assert!(config.debug && config.in_cluster && config.tag_worker_nodes);
        assert!(
            config
                .pool
                .contains("203.0.113.3".parse().expect("literal"))
        );
        assert_eq!(config.node_name.as_deref(), Some("node1"));
    }

    #[test]
    fn empty_environment_variables_count_as_unset() {
        let config = ok(&[], &[("LINKDEVICE", ""), ("XLB_IP_MODE", "")]);
        assert_eq!(config.link_device, None);
        assert_eq!(config.ip_mode, IpMode::Vip);
    }

    #[test]
    fn bad_pool_is_refused_naming_its_origin() {
        assert_eq!(
            err(&[], &[("RESTRICTED_CIDR", "10.0.0.0/33")]),
            r#"RESTRICTED_CIDR: "10.0.0.0/33" is not a CIDR or range"#
        );
        assert_eq!(
            err(&["--restricted-cidr", "10.0.0.0/8, 10.0.0.9-10.0.0.1"], &[]),
            r#"--restricted-cidr: "10.0.0.9-10.0.0.1" is not a CIDR or range"#
        );
        let file = config_file("restricted-cidr: banana\n");
        assert_eq!(
            err(&["--config", path(&file)], &[]),
            format!(
                r#"restricted-cidr in {}: "banana" is not a CIDR or range"#,
                path(&file)
            )
        );
    }

    #[test]
    fn bad_enum_and_bool_values_are_refused_naming_their_origin() {
        let message = err(&[], &[("XLB_IP_MODE", "direct")]);
        assert!(
            message.starts_with(r#"XLB_IP_MODE: "direct" is not valid"#) && message.contains("vip"),
            "{message}"
        );
        let message = err(&[], &[("DEBUG", "maybe")]);
        assert!(
            message.starts_with(r#"DEBUG: "maybe" is not valid"#),
            "{message}"
        );
        let file = config_file("announce: bgp\n");
        let message = err(&["--config", path(&file)], &[]);
        assert!(
            message.starts_with(&format!(r#"announce in {}: "bgp""#, path(&file))),
            "{message}"
        );
        let message = err(&["--xdp-mode", "fast"], &[]);
        assert!(
            message.contains("fast") && message.contains("--xdp-mode"),
            "{message}"
        );
    }

    #[test]
    fn hostname_node_addresses_are_refused() {
        let message = err(&[], &[("XLB_NODE_ADDRESS_TYPE", "Hostname")]);
        assert!(
            message.contains("XLB_NODE_ADDRESS_TYPE")
                && message.contains("Hostname is not an IP address"),
            "{message}"
        );
        let message = err(&["--node-address-type", "Hostname"], &[]);
        assert!(
            message.contains("Hostname is not an IP address"),
            "{message}"
        );
        assert_eq!(
            ok(&["--node-address-type", "ExternalIP"], &[]).node_address_type,
            NodeAddressType::ExternalIp
        );
    }

    #[test]
    fn worker_label_accepts_key_or_key_value() {
        assert_eq!(
            ok(&["--worker-label", "pool=edge"], &[]).worker_label,
            Some(LabelFilter {
                key: "pool".to_owned(),
                value: Some("edge".to_owned())
            })
        );
        assert_eq!(ok(&["--worker-label", ""], &[]).worker_label, None);
        assert!(err(&["--worker-label", "=x"], &[]).contains("no label key"));
    }

    #[test]
    fn unknown_or_malformed_config_files_are_refused() {
        let file = config_file("restricted-cider: 10.0.0.0/8\n");
        let message = err(&["--config", path(&file)], &[]);
        assert!(
            message.contains(r#"unknown key "restricted-cider""#)
                && message.contains("restricted-cidr"),
            "{message}"
        );
        let file = config_file("help: true\n");
        assert!(err(&["--config", path(&file)], &[]).contains(r#"unknown key "help""#));
        let file = config_file("- just\n- a list\n");
        assert!(err(&["--config", path(&file)], &[]).contains("must be a mapping"));
        let file = config_file("lb-class: {nested: map}\n");
        assert!(err(&["--config", path(&file)], &[]).contains("must be a scalar"));
        assert!(
            err(&["--config", "/nonexistent/xlb.yaml"], &[]).contains("cannot read config file")
        );
    }

    #[test]
    fn help_shows_every_env_var_and_default() {
        let help = Args::command().render_long_help().to_string();
        for env in [
            "XLB_CONFIG",
            "KUBECONFIG",
            "LINKDEVICE",
            "DEBUG",
            "KUBERNETES",
            "RESTRICTED_CIDR",
            "TAG_WORKER_NODES",
            "XLB_LB_CLASS",
            "XLB_MANIFESTS",
            "XLB_WORKER_LABEL",
            "XLB_NODE_ADDRESS_TYPE",
            "NODE_NAME",
            "XLB_IP_MODE",
            "XLB_UPDATE_EXTERNAL_IPS",
            "XLB_KEEP_ON_EXIT",
            "XLB_CLEANUP",
            "XLB_ANNOUNCE",
            "XLB_ANNOUNCE_LOCAL_ONLY",
            "XLB_XDP_MODE",
            "XLB_DATAPLANE",
            "XLB_METRICS_ADDR",
            "XLB_PIN_DIR",
            "XLB_SNAT_PORTS",
            "XLB_SNAT_ADDRESSES",
        ] {
            assert!(
                help.contains(&format!("[env: {env}")),
                "--help lacks {env}:\n{help}"
            );
        }
        for default in [
            "[default: node-role.kubernetes.io/worker]",
            "[default: InternalIP]",
            "[default: vip]",
            "[default: link]",
            "[default: auto]",
            "[default: both]",
            "[default: 0.0.0.0:9464]",
            "[default: /sys/fs/bpf/xlb]",
            "[default: 1024-32767]",
        ] {
            assert!(help.contains(default), "--help lacks {default}:\n{help}");
        }
        assert!(
            help.contains("--link-device"),
            "--help lacks the alias:\n{help}"
        );
    }

    #[test]
    fn snat_ports_parse_from_flag_and_env_and_bad_ranges_are_refused() {
        assert_eq!(
            load(&[], &[]).expect("defaults").snat_ports,
            lb_common::SNAT_PORTS_DEFAULT
        );
        let config = load(&["--snat-ports", "10000-22344"], &[]).expect("flag");
        assert_eq!(
            config.snat_ports,
            SnatPorts::new(10000, 22344).expect("range")
        );
        let config = load(&[], &[("XLB_SNAT_PORTS", "61000-65535")]).expect("env");
        assert_eq!(
            config.snat_ports,
            SnatPorts::new(61000, 65535).expect("range")
        );
        for (bad, why) in [
            ("5000", "is not a port range"),
            ("30000-20000", "at least 1024 ports"),
            ("20000-20100", "at least 1024 ports"),
            ("80-5000", "1024 or above"),
            ("1024-70000", "is not a port range"),
        ] {
            let message = match load(&["--snat-ports", bad], &[]) {
                Err(error) => error.to_string(),
                Ok(config) => panic!("{bad} accepted: {:?}", config.snat_ports),
            };
            assert!(message.contains(why), "{bad}: {message}");
        }
    }

    #[test]
    fn snat_addresses_parse_as_a_list() {
        assert!(load(&[], &[]).expect("defaults").snat_addresses.is_empty());
        let config = load(
            &[
                "--snat-addresses",
                "203.0.113.50, 203.0.113.51,203.0.113.50",
            ],
            &[],
        )
        .expect("list");
        assert_eq!(
            config.snat_addresses,
            vec![
                Ipv4Addr::new(203, 0, 113, 50),
                Ipv4Addr::new(203, 0, 113, 51)
            ]
        );
        let message = load(&[], &[("XLB_SNAT_ADDRESSES", "203.0.113.50,nope")])
            .expect_err("not an address")
            .to_string();
        assert!(
            message.contains("nope") && message.contains("XLB_SNAT_ADDRESSES"),
            "{message}"
        );
    }

    #[test]
    fn help_and_version_are_returned_for_main_to_print() {
        for flag in ["--help", "--version"] {
            match load(&[flag], &[]) {
                Err(ConfigError::Args(error)) => assert!(
                    matches!(
                        error.kind(),
                        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
                    ),
                    "{flag}: {error}"
                ),
                other => panic!("{flag} should come back as a clap error, got {other:?}"),
            }
        }
    }
}
