//! The shred ledger: an append-only file, kept with the master keyring (not in the data
//! directory), naming every tenant and key version ever crypto-shredded, so that a restored
//! backup — which still holds those wrapped keys — is shredded again before it serves.
//!
//! # Format
//!
//! One JSON object per line: `seq`, `time`, `kind` (`genesis`, `tenant`, `version`),
//! `tenant_id`, `version`, `master_version`, `prev_mac`, `mac`. Entry 0 is the genesis entry.
//! `mac` is HMAC-SHA256 under a key derived from master version `master_version` (label
//! [`labels::SHRED_LEDGER`], see [`super::mac`]) over
//! `be64(seq) ‖ be64(time) ‖ lp(kind) ‖ lp(tenant_id) ‖ be32(version) ‖ be32(master_version)
//! ‖ lp(prev_mac)`, and `prev_mac` is the previous entry's `mac`: a chain.
//!
//! # What it detects, and what it cannot
//!
//! - An entry edited, inserted or removed in the middle: the chain breaks (MAC or link).
//! - Entries removed from the end, or the whole file removed or replaced by an older copy:
//!   `keys.db` records the ledger's length and head MAC after every append
//!   (`KeyStore::set_shred_ledger_head`), and a ledger shorter than that, or with another MAC
//!   at that position, is refused at every start. A fresh forged ledger needs the master key.
//! - Not detectable: someone who can write both the ledger and the data directory rolling
//!   both back together to an older consistent pair (an old backup of `keys.db` with a
//!   truncated ledger). Keep the ledger on storage the data-directory operators cannot
//!   rewrite (append-only, replicated with the keyring); see docs/OPERATIONS.md.
//! - Entries MAC'd under a master version since removed from the keyring cannot be verified
//!   by MAC; their links are still checked, and they are applied (applying one can only
//!   destroy, never resurrect).
//!
//! Writers (the server, `rotate`, `restore`) serialize on an exclusive lock of the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::mac::MacKey;
use crate::crypto::labels::{self, push_length_prefixed};
use crate::domain::{TenantId, TenantState, unix_now};
use crate::error::{Error, Result};
use crate::keys::{KeyManager, MasterKeySource, MasterKeyring, ShredRecorder};
use crate::store::{KeyStore, LedgerHead, ShredItem};

/// Suffix of the default ledger file beside a keyring file: `<keyring>.shred-ledger`.
pub const LEDGER_SUFFIX: &str = ".shred-ledger";
/// The default ledger file inside the data directory when the master keys come from the
/// environment and no `--shred-ledger` is given: where the default keyring file
/// (`<data-dir>/master.keyring`) keeps its ledger, so a deployment that moves from that file
/// to environment keys keeps its ledger.
pub const DATA_DIR_LEDGER: &str = "master.keyring.shred-ledger";

/// Where the ledger lives by default: beside the keyring file, or (environment-provided master
/// keys) in the data directory, which does not survive the data directory being wiped.
pub fn default_path(source: &MasterKeySource, data_dir: &Path) -> PathBuf {
    match source.keyring_file() {
        Some(keyring) => {
            let mut name = keyring.as_os_str().to_owned();
            name.push(LEDGER_SUFFIX);
            PathBuf::from(name)
        }
        None => data_dir.join(DATA_DIR_LEDGER),
    }
}

const GENESIS: &str = "genesis";
const TENANT: &str = "tenant";
const VERSION: &str = "version";

/// One line of the ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    seq: u64,
    time: i64,
    kind: String,
    tenant_id: String,
    version: u32,
    master_version: u32,
    prev_mac: String,
    mac: String,
}

impl Entry {
    fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        push_length_prefixed(&mut out, self.kind.as_bytes());
        push_length_prefixed(&mut out, self.tenant_id.as_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.master_version.to_be_bytes());
        push_length_prefixed(&mut out, self.prev_mac.as_bytes());
        out
    }

    fn item(&self) -> Result<Option<ShredItem>> {
        let bad = || Error::FailedPrecondition(format!("entry {} is malformed", self.seq));
        match self.kind.as_str() {
            GENESIS => Ok(None),
            TENANT => Ok(Some(ShredItem {
                tenant_id: TenantId::parse(&self.tenant_id).map_err(|_| bad())?,
                version: None,
            })),
            VERSION if self.version > 0 => Ok(Some(ShredItem {
                tenant_id: TenantId::parse(&self.tenant_id).map_err(|_| bad())?,
                version: Some(self.version),
            })),
            _ => Err(bad()),
        }
    }
}

fn genesis_prev() -> String {
    hex::encode([0u8; super::mac::MAC_LEN])
}

/// What a ledger holds, verified.
#[derive(Debug, Default)]
pub struct LedgerContents {
    /// Number of entries.
    count: u64,
    /// The last entry's MAC.
    last_mac: Option<String>,
    /// Every entry's MAC, in order (empty when only the tail was read, for an append).
    macs: Vec<String>,
    /// Every destroyed tenant and version it names.
    pub items: BTreeSet<ShredItem>,
    /// Entries whose MAC could not be checked (their master version is not in the keyring).
    pub unverified: u64,
}

impl LedgerContents {
    /// The number of entries and the last one's MAC; `None` for an empty ledger.
    pub fn head(&self) -> Option<LedgerHead> {
        self.last_mac.as_ref().map(|mac| LedgerHead {
            entries: self.count,
            head_mac: hex::decode(mac).unwrap_or_default(),
        })
    }

    /// Whether the ledger says the whole tenant was destroyed.
    pub fn tenant_destroyed(&self, id: &TenantId) -> bool {
        self.items.contains(&ShredItem {
            tenant_id: id.clone(),
            version: None,
        })
    }

    /// The versions of a tenant the ledger says were destroyed.
    pub fn versions_destroyed(&self, id: &TenantId) -> BTreeSet<u32> {
        self.items
            .iter()
            .filter(|i| &i.tenant_id == id)
            .filter_map(|i| i.version)
            .collect()
    }

    fn covers(&self, item: &ShredItem) -> bool {
        self.tenant_destroyed(&item.tenant_id) || self.items.contains(item)
    }
}

/// What [`ShredLedger::enforce`] did.
#[derive(Debug, Default)]
pub struct ShredReport {
    /// Entries in the ledger afterwards.
    pub ledger_entries: u64,
    /// Entries whose MAC could not be checked (master version no longer in the keyring).
    pub unverified_entries: u64,
    /// Items the store held alive although the ledger says destroyed: shredded again now.
    pub reapplied: Vec<ShredItem>,
    /// Tenants whose primary version had to be shredded again and that got a new primary.
    pub rotated: Vec<TenantId>,
    /// Destructions the store had that the ledger lacked (a crash between the two writes, or
    /// a data directory older than the ledger): recorded now.
    pub recorded_from_store: Vec<ShredItem>,
}

/// The shred ledger of one deployment.
pub struct ShredLedger {
    path: PathBuf,
    source: MasterKeySource,
    store: Arc<dyn KeyStore>,
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("shred ledger {}: {e}", path.display()))
}

impl ShredLedger {
    /// The ledger at `path`, MAC'd with keys from `source`, mirroring its head into `store`.
    pub fn new(path: PathBuf, source: MasterKeySource, store: Arc<dyn KeyStore>) -> Self {
        Self {
            path,
            source,
            store,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_locked(&self, create: bool) -> Result<Option<File>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o600)
            .open(&self.path);
        let file = match file {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) => return Err(io_error(&self.path, e)),
        };
        // Every writer (server, rotate, restore, import) takes this lock before reading the
        // head, so two processes never append the same sequence number.
        file.lock().map_err(|e| io_error(&self.path, e))?;
        Ok(Some(file))
    }

    /// Reads and verifies the ledger (an empty one if the file does not exist).
    pub fn read(&self) -> Result<LedgerContents> {
        let ring = MasterKeyring::load(&self.source, false)?;
        match self.open_locked(false)? {
            Some(mut file) => self.read_verified(&mut file, &ring, false),
            None => Ok(LedgerContents::default()),
        }
    }

    /// Reads the whole file and returns its complete lines. A last line without its newline
    /// is a write torn by a crash (never acknowledged): it is left out, and with `repair` cut
    /// off the file too, so the next append starts on a line of its own.
    fn complete_lines(&self, file: &mut File, repair: bool) -> Result<String> {
        let mut text = String::new();
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_string(&mut text))
            .map_err(|e| io_error(&self.path, e))?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            tracing::warn!(path = %self.path.display(), "shred ledger ends with a torn write; ignoring it");
            if repair {
                file.set_len(complete as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io_error(&self.path, e))?;
            }
            text.truncate(complete);
        }
        Ok(text)
    }

    /// Reads the complete lines ([`Self::complete_lines`]: a torn last write is ignored, and
    /// with `repair` cut off) and verifies the chain.
    fn read_verified(
        &self,
        file: &mut File,
        ring: &MasterKeyring,
        repair: bool,
    ) -> Result<LedgerContents> {
        let text = self.complete_lines(file, repair)?;
        let mut contents = LedgerContents::default();
        let mut prev = genesis_prev();
        let mut keys: BTreeMap<u32, MacKey> = BTreeMap::new();
        let tampered = |seq: usize, why: &str| {
            Error::FailedPrecondition(format!(
                "the shred ledger {} does not verify at entry {seq}: {why}. It was edited; \
                 restore it from its copy (kept with the master keyring) before starting",
                self.path.display()
            ))
        };
        for (index, line) in text.lines().enumerate() {
            let entry: Entry =
                serde_json::from_str(line).map_err(|_| tampered(index, "not a ledger entry"))?;
            if entry.seq != index as u64 {
                return Err(tampered(index, "an entry is missing or out of order"));
            }
            if (index == 0) != (entry.kind == GENESIS) {
                return Err(tampered(index, "the genesis entry is missing or repeated"));
            }
            if entry.prev_mac != prev {
                return Err(tampered(index, "it does not link to the entry before it"));
            }
            match entry_key(&mut keys, ring, entry.master_version)? {
                Some(key) => {
                    if !key.verify_hex(labels::SHRED_LEDGER, &entry.message(), &entry.mac) {
                        return Err(tampered(index, "its MAC is wrong"));
                    }
                }
                None => contents.unverified += 1,
            }
            if let Some(item) = entry
                .item()
                .map_err(|_| tampered(index, "malformed entry"))?
            {
                contents.items.insert(item);
            }
            prev = entry.mac.clone();
            contents.count += 1;
            contents.macs.push(entry.mac.clone());
            contents.last_mac = Some(entry.mac);
        }
        Ok(contents)
    }

    /// Reads only what an append needs: the number of entries and the last MAC (the chain is
    /// verified in full whenever a data directory opens; the last entry's MAC is checked
    /// here), so an append costs one read, not one MAC per entry.
    fn read_tail(&self, file: &mut File, ring: &MasterKeyring) -> Result<LedgerContents> {
        let text = self.complete_lines(file, true)?;
        let Some(line) = text.lines().next_back() else {
            return Ok(LedgerContents::default());
        };
        let bad = || {
            Error::FailedPrecondition(format!(
                "the shred ledger {} does not verify at its last entry; restore it from its \
                 copy",
                self.path.display()
            ))
        };
        let entry: Entry = serde_json::from_str(line).map_err(|_| bad())?;
        let mut keys = BTreeMap::new();
        if let Some(key) = entry_key(&mut keys, ring, entry.master_version)?
            && !key.verify_hex(labels::SHRED_LEDGER, &entry.message(), &entry.mac)
        {
            return Err(bad());
        }
        Ok(LedgerContents {
            count: entry.seq + 1,
            last_mac: Some(entry.mac),
            ..LedgerContents::default()
        })
    }

    /// Appends entries (a genesis entry first if the ledger is empty) after `contents`,
    /// durably (fsync), then records the new head in the key store.
    fn write_entries(
        &self,
        file: &mut File,
        ring: &MasterKeyring,
        contents: &mut LedgerContents,
        items: &[ShredItem],
    ) -> Result<()> {
        let master_version = ring.primary_version();
        let key = MacKey::from_keyring(ring, labels::SHRED_LEDGER, master_version, b"")?;
        let mut lines = String::new();
        let mut push = |contents: &mut LedgerContents, kind: &str, item: Option<&ShredItem>| {
            let mut entry = Entry {
                seq: contents.count,
                time: unix_now(),
                kind: kind.to_owned(),
                tenant_id: item
                    .map(|i| i.tenant_id.as_str().to_owned())
                    .unwrap_or_default(),
                version: item.and_then(|i| i.version).unwrap_or(0),
                master_version,
                prev_mac: contents.last_mac.clone().unwrap_or_else(genesis_prev),
                mac: String::new(),
            };
            entry.mac = hex::encode(key.sign(labels::SHRED_LEDGER, &entry.message()));
            lines.push_str(&serde_json::to_string(&entry).unwrap_or_default());
            lines.push('\n');
            if let Some(item) = item {
                contents.items.insert(item.clone());
            }
            contents.count += 1;
            contents.macs.push(entry.mac.clone());
            contents.last_mac = Some(entry.mac);
        };
        let created = contents.count == 0;
        if created {
            push(contents, GENESIS, None);
        }
        for item in items {
            if !contents.covers(item) {
                push(
                    contents,
                    if item.version.is_some() {
                        VERSION
                    } else {
                        TENANT
                    },
                    Some(item),
                );
            }
        }
        if lines.is_empty() {
            return Ok(());
        }
        file.seek(SeekFrom::End(0))
            .and_then(|_| file.write_all(lines.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error(&self.path, e))?;
        if created && let Some(dir) = self.path.parent() {
            let _ = crate::fsutil::sync_dir(dir);
        }
        if let Some(head) = contents.head() {
            self.store.set_shred_ledger_head(&head)?;
        }
        Ok(())
    }

    /// Records destructions (durably, before returning).
    pub fn append(&self, items: &[ShredItem]) -> Result<()> {
        let ring = MasterKeyring::load(&self.source, false)?;
        let mut file = self
            .open_locked(true)?
            .ok_or_else(|| Error::internal("ledger not created"))?;
        let mut contents = self.read_tail(&mut file, &ring)?;
        self.write_entries(&mut file, &ring, &mut contents, items)
    }

    /// Records the items this ledger does not cover yet (durably, before returning) and
    /// returns them: how a node of a shared store records destructions made through other
    /// nodes ([`follow_shared_store`]). Reads the whole ledger (it must know what it covers).
    pub fn record_missing(&self, items: &[ShredItem]) -> Result<Vec<ShredItem>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let ring = MasterKeyring::load(&self.source, false)?;
        let mut file = self
            .open_locked(true)?
            .ok_or_else(|| Error::internal("ledger not created"))?;
        let mut contents = self.read_verified(&mut file, &ring, true)?;
        let mut missing: Vec<ShredItem> = items
            .iter()
            .filter(|item| !contents.covers(item))
            .cloned()
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            self.write_entries(&mut file, &ring, &mut contents, &missing)?;
        }
        Ok(missing)
    }

    /// Run whenever a data directory opens (server start, every command, restore, import):
    /// verifies the ledger against itself and against the head `keys.db` last saw, records
    /// destructions the store has and the ledger lacks, and crypto-shreds again everything
    /// the ledger names that the store holds alive (a restored backup). A tenant whose
    /// primary version is shredded again gets a new primary, so it can encrypt.
    pub fn enforce(&self, keys: &KeyManager) -> Result<ShredReport> {
        let ring = MasterKeyring::load(&self.source, false)?;
        let seen = self.store.shred_ledger_head()?;
        let Some(mut file) = self.open_locked(seen.is_none())? else {
            let seen = seen.map_or(0, |h| h.entries);
            return Err(Error::FailedPrecondition(format!(
                "the shred ledger {} is missing, but keys.db has seen {seen} entries of it: \
                 restore the ledger (it is kept with the master keyring), or pass \
                 --shred-ledger FILE if it lives elsewhere; without it a restored backup could \
                 bring destroyed keys back",
                self.path.display()
            )));
        };
        let mut contents = self.read_verified(&mut file, &ring, true)?;
        if let Some(seen) = &seen {
            let entries = contents.count;
            if entries < seen.entries {
                return Err(Error::FailedPrecondition(format!(
                    "the shred ledger {} has {entries} entries, but keys.db has seen {}: it \
                     was truncated or replaced by an older copy; restore the current ledger \
                     before starting",
                    self.path.display(),
                    seen.entries
                )));
            }
            let at = usize::try_from(seen.entries.saturating_sub(1)).unwrap_or(usize::MAX);
            let matches = contents
                .macs
                .get(at)
                .and_then(|mac| hex::decode(mac).ok())
                .is_some_and(|mac| crate::crypto::envelope::constant_time_eq(&mac, &seen.head_mac));
            if !matches {
                return Err(Error::FailedPrecondition(format!(
                    "the shred ledger {} is not the one keys.db has seen (entry {at} differs): \
                     it was replaced; restore the current ledger before starting",
                    self.path.display()
                )));
            }
        }
        let mut report = ShredReport::default();
        let ledger_items: Vec<ShredItem> = contents.items.iter().cloned().collect();
        let missing: Vec<ShredItem> = self
            .store
            .destroyed_items()?
            .into_iter()
            .filter(|item| !contents.covers(item))
            .collect();
        self.write_entries(&mut file, &ring, &mut contents, &missing)?;
        report.recorded_from_store = missing;
        report.reapplied = self.store.shred(&ledger_items, unix_now())?;
        for item in &report.reapplied {
            let Some(version) = item.version else {
                continue;
            };
            let Some(tenant) = self.store.tenant(&item.tenant_id)? else {
                continue;
            };
            if tenant.primary_version == version
                && matches!(tenant.state, TenantState::Active | TenantState::Suspended)
            {
                keys.rotate(&item.tenant_id)?;
                report.rotated.push(item.tenant_id.clone());
            }
        }
        if let Some(head) = contents.head() {
            self.store.set_shred_ledger_head(&head)?;
        }
        report.ledger_entries = contents.count;
        report.unverified_entries = contents.unverified;
        Ok(report)
    }
}

impl ShredRecorder for ShredLedger {
    fn tenant_destroyed(&self, id: &TenantId) -> Result<()> {
        self.append(&[ShredItem {
            tenant_id: id.clone(),
            version: None,
        }])
        .map_err(|e| not_recorded(&self.path, &format!("tenant {id}"), &e))
    }

    fn version_destroyed(&self, id: &TenantId, version: u32) -> Result<()> {
        self.append(&[ShredItem {
            tenant_id: id.clone(),
            version: Some(version),
        }])
        .map_err(|e| {
            not_recorded(
                &self.path,
                &format!("key version {version} of tenant {id}"),
                &e,
            )
        })
    }
}

/// How often a node of a shared store asks it for destructions made through other nodes.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Keeps `ledger` complete on a key store that several nodes share (PostgreSQL): each node's
/// ledger is a file of its own, yet must name every destruction made through any node, so
/// that a restored database is shredded again by whichever node starts on it. Records what
/// the store holds destroyed now, then starts a thread that every [`FOLLOW_EVERY`] records
/// the destructions committed since ([`crate::store::BackupStore::destructions_since`]),
/// until the ledger is dropped. A store without other writers (SQLite: each process records
/// its own destructions) gets no thread. A failed step is logged and retried; a destruction
/// never missed for long is also recorded at the next start (`enforce`).
pub fn follow_shared_store(ledger: &Arc<ShredLedger>) -> Result<()> {
    let Some((mut cursor, items)) = ledger.store.destructions_since(None)? else {
        return Ok(());
    };
    ledger.record_missing(&items)?;
    let weak = Arc::downgrade(ledger);
    std::thread::Builder::new()
        .name("kms-shred-ledger".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(FOLLOW_EVERY);
                let Some(ledger) = weak.upgrade() else {
                    return;
                };
                let step = ledger
                    .store
                    .destructions_since(Some(cursor))
                    .and_then(|found| match found {
                        Some((next, items)) => Ok((next, ledger.record_missing(&items)?)),
                        None => Ok((cursor, Vec::new())),
                    });
                match step {
                    Ok((next, recorded)) => {
                        cursor = next;
                        for item in recorded {
                            tracing::info!(
                                tenant = %item.tenant_id,
                                version = ?item.version,
                                "shred ledger: recorded a destruction made through another node"
                            );
                        }
                        if failing {
                            tracing::info!("shred ledger: following the store's destructions again");
                            failing = false;
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "shred ledger: cannot record other nodes' destructions now; retrying");
                            failing = true;
                        }
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::internal(format!("cannot start the shred-ledger thread: {e}")))
}

/// The MAC key of a master version, derived once per read; `None` if the keyring no longer
/// holds that version.
fn entry_key<'a>(
    keys: &'a mut BTreeMap<u32, MacKey>,
    ring: &MasterKeyring,
    master_version: u32,
) -> Result<Option<&'a MacKey>> {
    if let std::collections::btree_map::Entry::Vacant(slot) = keys.entry(master_version) {
        let Some(master) = ring.get(master_version) else {
            return Ok(None);
        };
        slot.insert(
            MacKey::derive(master, labels::SHRED_LEDGER, master_version, b"")
                .map_err(|_| Error::internal("ledger key derivation failed"))?,
        );
    }
    Ok(keys.get(&master_version))
}

fn not_recorded(path: &Path, what: &str, e: &Error) -> Error {
    Error::Internal(format!(
        "{what} was destroyed, but the shred ledger {} could not record it ({e}); the next \
         start records it from the key store",
        path.display()
    ))
}
