//! Snapshots of a running VM (full, diff, fork) and the uffd working set.
//!
//! A snapshot directory holds the state file (`vmstate`, see [`crate::state`]) and the
//! memory layers written for it (`NNNN.mlayer`, grove-memory's layer format). The state file
//! lists the whole layer chain, base first, by absolute path: a diff snapshot's directory holds
//! only its new layer and refers to the older ones where they are.
//!
//! - `full`: pause, write every non-zero page, save state, resume. Turns dirty logging on, so
//!   later snapshots can be diffs.
//! - `diff`: pause, write the pages dirtied since the last snapshot (KVM's dirty log of the
//!   guest's writes, ORed with the pages the VMM wrote on the guest's behalf), save, resume.
//! - `fork`: like `diff`, but if there is no base yet the full layer is first copied while the
//!   guest runs (through volatile slices; dirty logging on), then the pause only writes the
//!   pages dirtied meanwhile. Either way the pause grows with the dirty set, not memory size.
//!
//! Disks: before the pause each virtio-blk disk checks that its writable layer can be frozen
//! into the snapshot directory and makes the layer it will continue on; during the pause
//! (requests all served, see [`crate::devices::virtio::block`]) the layer is flushed and moved
//! into the directory as `disk-<id>.data`/`.idx`, and the state file names the disk's frozen
//! chain relative to the directory.
//!
//! Restoring is the builder's ([`crate::builder`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use grove_memory::{write_diff, write_full, LayerError, RegionMemory, WorkingSet, WriteOptions};

use crate::devices::manager::DeviceManagerError;
use crate::memory::RegionSlice;
use crate::persist::Persist;
use crate::state::{self, SnapshotState, StateError};
use crate::vmm::{Vmm, VmmError};
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vm::VmError;

pub use grove_vmm_api::SnapshotReport;

/// Errors of snapshot and fork.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot directory cannot be created or resolved.
    #[error("snapshot directory {path}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A relative snapshot directory (the VMM's working directory is no reference point).
    #[error("snapshot directory {0}: must be an absolute path")]
    RelativeDir(String),
    /// The snapshot directory already holds a snapshot.
    #[error("snapshot directory {0}: already holds a snapshot")]
    Exists(String),
    /// A diff needs a previous snapshot.
    #[error("no previous snapshot to diff against: take a full snapshot first")]
    NoBase,
    /// A working set exists only for memory served by a page server.
    #[error("not restored in uffd mode: no working set to save")]
    NotUffd,
    /// The page server failed: guest memory is inaccessible.
    #[error("guest memory unavailable: page server failed: {0}")]
    MemoryUnavailable(String),
    /// Writing memory layers or the working set.
    #[error("memory layer")]
    Layer(#[from] LayerError),
    /// The state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// Saving a vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Pausing, resuming, dirty logging.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// Saving the VM, reading the dirty log.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Saving the devices.
    #[error("saving devices")]
    Devices(#[from] DeviceManagerError),
}

/// Kinds of snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Every non-zero page.
    Full,
    /// Pages dirtied since the previous snapshot.
    Diff,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The snapshot directory: an absolute path whose parent exists; the directory itself is
/// created if missing (only that last component: a typo in a parent is an error, not a new
/// tree), or reused if empty of a snapshot. Temporary files a killed writer left there are
/// swept first.
fn prepare_dir(dir: &Path) -> Result<PathBuf, SnapshotError> {
    if !dir.is_absolute() {
        return Err(SnapshotError::RelativeDir(dir.display().to_string()));
    }
    let err = |source| SnapshotError::Dir { path: dir.display().to_string(), source };
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(err(e)),
    }
    let dir = dir.canonicalize().map_err(err)?;
    if dir.join(state::STATE_FILE).exists() {
        return Err(SnapshotError::Exists(dir.display().to_string()));
    }
    sweep(&dir, false);
    Ok(dir)
}

/// Removes the temporary files of an unfinished snapshot in `dir`: memory layers of writers
/// that are gone (and ours when `own`: after our own failed snapshot), and the state file's
/// temporary (its writer is the one snapshot of this directory). Logged, not fatal.
pub fn sweep(dir: &Path, own: bool) {
    let mut removed = grove_memory::sweep_stale_tmp(dir, own);
    let st = dir.join(format!("{}.tmp", state::STATE_FILE));
    if std::fs::remove_file(&st).is_ok() {
        removed.push(st);
    }
    for p in removed {
        crate::errln!("grove-vmm: removed stale temporary file {}", p.display());
    }
}

impl Vmm {
    /// Guest memory as the layer writer reads it: volatile slices, so the fork pre-copy may
    /// read while the guest runs (torn pages are rewritten from the dirty log by the diff
    /// taken while paused).
    fn region_memory<'a>(
        &'a self,
        dirty: Option<&'a [Vec<u64>]>,
    ) -> Vec<RegionMemory<'a, RegionSliceBitmap<'a>>> {
        (0..self.ram.regions().len())
            .filter_map(|i| {
                let mem: RegionSlice<'a> = self.ram.region_volatile(i)?;
                Some(RegionMemory {
                    gpa: self.ram.regions()[i].gpa,
                    mem,
                    dirty: dirty.map(|d| d[i].as_slice()),
                })
            })
            .collect()
    }

    /// The pages dirtied since the last call, per region: KVM's log of the guest's writes
    /// ORed with the pages the VMM wrote through vm-memory (device buffers, used rings).
    fn dirty_bitmaps(&self) -> Result<Vec<Vec<u64>>, SnapshotError> {
        let mut maps = self.vm.dirty_log(&self.ram)?;
        for (i, m) in maps.iter_mut().enumerate() {
            for (w, v) in m.iter_mut().zip(self.ram.take_vmm_dirty(i)) {
                *w |= v;
            }
        }
        Ok(maps)
    }

    /// Starts dirty logging, or resets the log if it is on (the VMM's bitmap too).
    fn restart_dirty_log(&mut self) -> Result<(), SnapshotError> {
        if self.dirty_logging {
            self.dirty_bitmaps()?;
        } else {
            self.set_dirty_logging(true)?;
            for i in 0..self.ram.regions().len() {
                self.ram.take_vmm_dirty(i);
            }
        }
        Ok(())
    }

    fn layer_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{:04}.{}", self.layers.len(), grove_memory::LAYER_EXT))
    }

    fn write_full_layer(&mut self, dir: &Path, fsync: bool) -> Result<u64, SnapshotError> {
        let path = dir.join(format!("0000.{}", grove_memory::LAYER_EXT));
        let opts = WriteOptions { fsync, ..Default::default() };
        let info = write_full(&path, &self.region_memory(None), &opts)?;
        self.layers = vec![path];
        let pages = info.present_pages;
        self.head = Some(info);
        Ok(pages)
    }

    fn write_diff_layer(&mut self, dir: &Path, fsync: bool) -> Result<u64, SnapshotError> {
        let parent = self.head.clone().ok_or(SnapshotError::NoBase)?;
        let dirty = self.dirty_bitmaps()?;
        let path = self.layer_path(dir);
        let opts = WriteOptions { fsync, ..Default::default() };
        let info = write_diff(&path, &parent, &self.region_memory(Some(&dirty)), &opts)?;
        self.layers.push(path);
        let pages = info.present_pages;
        self.head = Some(info);
        Ok(pages)
    }

    /// Saves vCPU, VM and device state into `dir` (vCPUs paused); disks freeze their writable
    /// layers into it first.
    fn save_state(&mut self, dir: &Path, fsync: bool) -> Result<(), SnapshotError> {
        self.devices.freeze_disks(dir, fsync)?;
        let list = match &self.msr_list {
            Some(l) => l.clone(),
            None => {
                let l = self
                    .vm
                    .kvm
                    .get_msr_index_list()
                    .map_err(|e| VmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
                let l = Arc::new(l.as_slice().to_vec());
                self.msr_list = Some(l.clone());
                l
            }
        };
        let vcpus = self
            .on_vcpus(move |v| {
                v.msr_list = list.clone();
                v.save()
            })?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        // Keep only the MSRs KVM gave: later saves skip the probing of unreadable ones.
        if let Some(v0) = vcpus.first() {
            self.msr_list = Some(Arc::new(v0.msrs.iter().map(|&(i, _)| i).collect()));
        }
        let s = SnapshotState {
            cpuid_fingerprint: self.fingerprint,
            nvcpus: u8::try_from(self.vcpus.len()).unwrap_or(u8::MAX),
            regions: self.ram.regions().to_vec(),
            layers: self
                .layers
                .iter()
                .map(|p| state::relative_to(p, dir).display().to_string())
                .collect(),
            vcpus,
            vm: self.vm.save()?,
            devices: self.devices.save()?,
        };
        state::write_state(dir, &s, fsync)?;
        Ok(())
    }

    /// Runs `f` with the vCPUs paused, restoring the running state afterwards (also on error).
    fn paused_op<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, SnapshotError>,
    ) -> Result<(T, f64), SnapshotError> {
        let was_paused = self.paused;
        let t = Instant::now();
        self.pause()?;
        let r = f(self);
        if !was_paused {
            self.resume()?;
        }
        Ok((r?, if was_paused { 0.0 } else { ms(t) }))
    }

    /// Takes a snapshot into `dir`.
    pub fn snapshot(
        &mut self,
        kind: SnapshotKind,
        dir: &Path,
        fsync: bool,
    ) -> Result<SnapshotReport, SnapshotError> {
        let t = Instant::now();
        self.check_memory()?;
        if kind == SnapshotKind::Diff && self.head.is_none() {
            return Err(SnapshotError::NoBase);
        }
        let dir = prepare_dir(dir)?;
        let r =
            self.devices.prepare_disk_snapshot(&dir).map_err(SnapshotError::from).and_then(|()| {
                self.paused_op(|vmm| {
                    let pages = match kind {
                        SnapshotKind::Full => {
                            vmm.restart_dirty_log()?;
                            vmm.write_full_layer(&dir, fsync)?
                        }
                        SnapshotKind::Diff => vmm.write_diff_layer(&dir, fsync)?,
                    };
                    vmm.save_state(&dir, fsync)?;
                    Ok(pages)
                })
            });
        let (pages, pause_ms) = r.inspect_err(|_| sweep(&dir, true))?;
        Ok(SnapshotReport {
            dir: dir.clone(),
            depth: u32::try_from(self.layers.len()).unwrap_or(u32::MAX),
            pages,
            pause_ms,
            total_ms: ms(t),
        })
    }

    /// The writes of [`Vmm::fork`] into a prepared directory: (pre-copied pages, pages of
    /// the diff, pause in ms).
    fn fork_into(&mut self, dir: &Path) -> Result<(u64, u64, f64), SnapshotError> {
        self.devices.prepare_disk_snapshot(dir)?;
        let mut pages = 0;
        if self.head.is_none() {
            // Pre-copy while the guest runs; what it dirties meanwhile goes into the diff.
            self.restart_dirty_log()?;
            pages += self.write_full_layer(dir, false)?;
        }
        let (diff_pages, pause_ms) = self.paused_op(|vmm| {
            let p = vmm.write_diff_layer(dir, false)?;
            vmm.save_state(dir, false)?;
            Ok(p)
        })?;
        Ok((pages, diff_pages, pause_ms))
    }

    /// Fork: a snapshot for children, with a pause bounded by the dirty set.
    pub fn fork(&mut self, dir: &Path) -> Result<SnapshotReport, SnapshotError> {
        let t = Instant::now();
        self.check_memory()?;
        let dir = prepare_dir(dir)?;
        let r = self.fork_into(&dir);
        let (pages, diff_pages, pause_ms) = r.inspect_err(|_| sweep(&dir, true))?;
        Ok(SnapshotReport {
            dir: dir.clone(),
            depth: u32::try_from(self.layers.len()).unwrap_or(u32::MAX),
            pages: pages + diff_pages,
            pause_ms,
            total_ms: ms(t),
        })
    }

    /// Saves the uffd page server's recorded working set next to the chain head, so later
    /// restores of this snapshot prefetch it.
    pub fn save_working_set(&mut self) -> Result<PathBuf, SnapshotError> {
        self.auto_working_set = None;
        let uffd = self.uffd().ok_or(SnapshotError::NotUffd)?;
        let head = self.layers.last().ok_or(SnapshotError::NoBase)?;
        let path = WorkingSet::default_path(head);
        uffd.working_set().save(&path)?;
        Ok(path)
    }

    /// Refuses to read guest memory whose page server has failed (it is inaccessible; the
    /// VM is about to end with the page server's error anyway).
    fn check_memory(&self) -> Result<(), SnapshotError> {
        match self.page_server_failure() {
            Some(e) => Err(SnapshotError::MemoryUnavailable(e)),
            None => Ok(()),
        }
    }
}

/// The bitmap slice type of a [`RegionSlice`].
type RegionSliceBitmap<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;
