//! Conntrack entries pinned by an xlb from before [`lb_common::RewriteSums`] (2026-12-08),
//! carried into this version's maps, so that an upgrade keeps established connections as a
//! restart does.
//!
//! Those entries were 48 bytes: the first 48 of today's [`CtEntry`], which appended the sums.
//! Before the programs load, each conntrack map pinned with that layout is read whole, the
//! sums of each entry are computed from its key, and the old pin is removed; the loader then
//! creates this version's map, and the entries are written into it. The old programs keep
//! running on the old maps until this xlb's programs, loaded and verified meanwhile, replace
//! them in the pinned links: what they write in between (a flow opened then, a FIN's state)
//! is lost.
//! A conntrack map of any other layout is refused by `pins::check_pinned_layout`.

use std::path::Path;

use aya::Ebpf;
use aya::maps::{HashMap, Map, MapData, MapInfo};
use lb_common::{CT_FWD_MAP, CT_HALF_MAP, CT_REV_MAP, CtEntry, FlowKey};

use super::DataplaneError;

/// Size of a conntrack entry before the sums were appended.
const ENTRY_SIZE_BEFORE_SUMS: usize = 48;
const _: () = assert!(core::mem::offset_of!(CtEntry, sums) == ENTRY_SIZE_BEFORE_SUMS);

/// The entries of one conntrack map of the layout before the sums, in today's layout.
#[derive(Debug)]
pub struct Carried {
    name: &'static str,
    entries: Vec<(FlowKey, CtEntry)>,
}

/// Reads the conntrack maps pinned in `dir` whose entries have the layout before the sums,
/// and removes their pins so that the loader creates this version's maps in their place.
pub fn take_entries_before_sums(dir: &Path) -> Result<Vec<Carried>, DataplaneError> {
    let mut carried = Vec::new();
    for name in [CT_FWD_MAP, CT_REV_MAP, CT_HALF_MAP] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let map_err = |source| DataplaneError::Map { name, source };
        let info = MapInfo::from_pin(&path).map_err(map_err)?;
        if info.key_size() as usize != size_of::<FlowKey>()
            || info.value_size() as usize != ENTRY_SIZE_BEFORE_SUMS
        {
            continue;
        }
        let map =
            Map::from_map_data(MapData::from_pin(&path).map_err(map_err)?).map_err(map_err)?;
        let old: HashMap<MapData, FlowKey, [u8; ENTRY_SIZE_BEFORE_SUMS]> =
            HashMap::try_from(map).map_err(map_err)?;
        let entries = old
            .iter()
            .map(|item| item.map(|(key, bytes)| (key, widen(&key, &bytes))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err)?;
        std::fs::remove_file(&path).map_err(|source| DataplaneError::Pin {
            path: path.clone(),
            source,
        })?;
        tracing::info!(
            path = %path.display(), entries = entries.len(),
            "carrying the conntrack entries of an xlb from before 2026-12-08 (48-byte layout) into this version's map"
        );
        carried.push(Carried { name, entries });
    }
    Ok(carried)
}

/// Writes the carried entries into this version's maps of `ebpf`, which the loader just
/// created.
pub fn restore(ebpf: &mut Ebpf, carried: Vec<Carried>) -> Result<(), DataplaneError> {
    for Carried { name, entries } in carried {
        let map_err = |source| DataplaneError::Map { name, source };
        let map = ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        let mut map: HashMap<&mut MapData, FlowKey, CtEntry> =
            HashMap::try_from(map).map_err(map_err)?;
        for (key, entry) in &entries {
            map.insert(key, entry, 0).map_err(map_err)?;
        }
    }
    Ok(())
}

/// The entry stored at `key` as `old`, the 48 bytes before the sums, in today's layout.
fn widen(key: &FlowKey, old: &[u8; ENTRY_SIZE_BEFORE_SUMS]) -> CtEntry {
    let mut bytes = [0u8; size_of::<CtEntry>()];
    bytes[..ENTRY_SIZE_BEFORE_SUMS].copy_from_slice(old);
    // SAFETY: CtEntry is repr(C) plain data of integers and byte arrays, for which any bytes
    // are a value; read unaligned, as the byte array is.
    let entry: CtEntry = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    entry.with_sums(key)
}
