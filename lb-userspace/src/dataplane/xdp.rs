//! Loads the embedded XDP object with aya, attaches it to devices and reads its maps.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{ProgramError, Xdp, XdpMode},
};
use lb_common::{STAT_COUNT, STATS_MAP};

/// The BPF object built by `build.rs` (aya-build), embedded at compile time.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Name of the XDP program inside [`BPF_OBJECT`].
pub const PROGRAM_NAME: &str = "xlb";

/// Errors from loading, attaching or reading the data plane.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("loading the BPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {PROGRAM_NAME} failed: {0}")]
    Program(#[from] ProgramError),
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("BPF map access failed: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error(
        "XDP attach failed on {iface} in both native and generic mode: native: {native}; generic: {generic}"
    )]
    Attach {
        iface: String,
        native: ProgramError,
        generic: ProgramError,
    },
}

/// How the program ended up attached to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP.
    Native,
    /// Generic (skb) XDP, used when the driver lacks native support.
    Generic,
}

/// Which mode to try when attaching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeChoice {
    /// Native, falling back to generic with a log line.
    #[default]
    Auto,
    /// Native only.
    Native,
    /// Generic only.
    Generic,
}

/// The loaded XDP program and its maps.
pub struct XdpProgram {
    ebpf: Ebpf,
}

impl XdpProgram {
    /// Loads [`BPF_OBJECT`] into the kernel (maps created, program verified).
    pub fn load() -> Result<Self, XdpError> {
        let mut ebpf = Ebpf::load(BPF_OBJECT)?;
        program_mut(&mut ebpf)?.load()?;
        Ok(Self { ebpf })
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> Result<&Xdp, XdpError> {
        let program = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?;
        Ok(program.try_into()?)
    }

    /// Attaches to `iface` in the mode asked for; `Auto` tries native first and falls back to
    /// generic, logging why.
    pub fn attach(&mut self, iface: &str, choice: ModeChoice) -> Result<AttachMode, XdpError> {
        let program = program_mut(&mut self.ebpf)?;
        match choice {
            ModeChoice::Native => program
                .attach(iface, XdpMode::Driver)
                .map(|_| AttachMode::Native)
                .map_err(Into::into),
            ModeChoice::Generic => program
                .attach(iface, XdpMode::Skb)
                .map(|_| AttachMode::Generic)
                .map_err(Into::into),
            ModeChoice::Auto => match program.attach(iface, XdpMode::Driver) {
                Ok(_) => Ok(AttachMode::Native),
                Err(native) => {
                    tracing::warn!(
                        iface,
                        error = %native,
                        "native XDP attach failed (driver lacks XDP?); falling back to generic mode"
                    );
                    match program.attach(iface, XdpMode::Skb) {
                        Ok(_) => Ok(AttachMode::Generic),
                        Err(generic) => Err(XdpError::Attach {
                            iface: iface.to_owned(),
                            native,
                            generic,
                        }),
                    }
                }
            },
        }
    }

    /// Reads the global counters, summed over CPUs, indexed by `lb_common::STAT_*`.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize], XdpError> {
        let map = self
            .ebpf
            .map(STATS_MAP)
            .ok_or(XdpError::MissingMap(STATS_MAP))?;
        let array = PerCpuArray::<_, u64>::try_from(map)?;
        let mut totals = [0u64; STAT_COUNT as usize];
        for (index, total) in (0..STAT_COUNT).zip(totals.iter_mut()) {
            *total = array.get(&index, 0)?.iter().sum();
        }
        Ok(totals)
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let program = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(ProgramError::NotLoaded)?;
    Ok(program.try_into()?)
}
