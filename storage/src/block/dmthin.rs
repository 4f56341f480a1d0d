//! The dm-thin backend, through the devicemapper crate.
//!
//! A pool is a device-mapper `thin-pool` over a metadata and a data device (real
//! block devices, or loop devices over files on a single host: [`attach_loop`]).
//! Every layer is a thin volume of that pool; a snapshot or a clone is a thin
//! snapshot (`create_snap`), O(1) in the disk size. Thin volumes do not depend on
//! their origin once created, so layers here stand alone (chains have depth 1 and
//! flatten is the identity).
//!
//! Layer ids and thin ids differ: at a disk snapshot the thin snapshot becomes the
//! frozen layer, and the writable layer keeps the active thin volume (so the
//! virtio-blk side never reopens its device).
//!
//! Crash safety: before a thin id is created in the pool it is written to the
//! catalog as an intent (`thin-create`); the record naming it is committed after
//! the thin exists, then the intent is cleared. At open, intents without a record
//! are deleted from the pool. Deletion removes the record first, then the thin.
//!
//! The kernel needs `CONFIG_DM_THIN_PROVISIONING`; [`dm_available`] says whether
//! device-mapper is there at all.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use devicemapper::{
    DataBlocks, Device, DmDevice, DmName, DmOptions, LinearDev, LinearDevTargetParams,
    LinearTargetParams, Sectors, TargetLine, ThinDev, ThinDevId, ThinPoolDev, ThinPoolStatus, DM,
};

use super::iov::Bufs;
use super::{
    check_range, check_sectors, BitmapSlice, BlockDevice, BlockError, BlockIo, BlockStore, LayerId,
    Usage, VolatileSlice, SECTOR_SIZE,
};
use crate::catalog::{Catalog, LayerKind, LayerRecord};

const INTENT: &str = "thin-create";
/// Catalog intent: thin `t` was released while a disk still had its device open; it is
/// deleted when that disk is dropped, or by the recovery pass after a crash.
const DELETE_INTENT: &str = "thin-delete";

/// Whether a device-mapper error is EBUSY (a device still open).
fn is_busy(e: &devicemapper::DmError) -> bool {
    matches!(e, devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno))
        if **errno as i32 == libc::EBUSY)
}
/// Thin ids are 24-bit in the kernel.
const MAX_THIN_ID: u64 = (1 << 24) - 1;
/// Pool data block size: 64 KiB (the kernel minimum).
const DATA_BLOCK: Sectors = Sectors(128);

fn dm_err(e: devicemapper::DmError) -> BlockError {
    BlockError::DeviceMapper(e.to_string())
}

/// Whether this kernel has device-mapper (`/proc/misc` lists it or
/// `/dev/mapper/control` opens). `Err` carries the reason to print when skipping.
pub fn dm_available() -> Result<(), String> {
    let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
    if misc.lines().any(|l| l.trim_end().ends_with("device-mapper")) {
        return Ok(());
    }
    if File::open("/dev/mapper/control").is_ok() {
        return Ok(());
    }
    Err("no device-mapper in this kernel".into())
}

/// Attaches a file to a free loop device (`losetup`), returning the device path.
pub fn attach_loop(file: &Path) -> Result<PathBuf, BlockError> {
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(file)
        .output()
        .map_err(|e| BlockError::io("losetup", e))?;
    if !out.status.success() {
        return Err(BlockError::DeviceMapper(format!(
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Detaches a loop device.
pub fn detach_loop(dev: &Path) -> Result<(), BlockError> {
    let st = std::process::Command::new("losetup")
        .arg("-d")
        .arg(dev)
        .status()
        .map_err(|e| BlockError::io("losetup -d", e))?;
    if st.success() {
        Ok(())
    } else {
        Err(BlockError::DeviceMapper(format!("losetup -d {}", dev.display())))
    }
}

fn blkdev_sectors(path: &Path) -> Result<Sectors, BlockError> {
    let mut f = File::open(path).map_err(|e| BlockError::io("open block device", e))?;
    let bytes = f.seek(SeekFrom::End(0)).map_err(|e| BlockError::io("size block device", e))?;
    Ok(Sectors(bytes / SECTOR_SIZE))
}

fn device_of(path: &Path) -> Result<Device, BlockError> {
    let devno = devicemapper::devnode_to_devno(path)
        .map_err(dm_err)?
        .ok_or_else(|| BlockError::Invalid(format!("{} is not a block device", path.display())))?;
    Ok(Device::from(devno))
}

struct Inner {
    dm: DM,
    pool: Mutex<ThinPoolDev>,
    prefix: String,
    catalog: Arc<Catalog>,
    /// Released thins whose device a live disk still holds open, by device name.
    doomed: Mutex<std::collections::HashMap<String, u32>>,
}

/// A store of thin volumes in one thin pool.
#[derive(Clone)]
pub struct DmThinStore {
    inner: Arc<Inner>,
}

/// A writable thin volume.
pub struct DmThinDisk {
    store: Arc<Inner>,
    size: u64,
    /// (layer id, active thin device, its block device node opened).
    state: RwLock<(LayerId, ThinDev, File)>,
}

impl Inner {
    fn name(&self, thin: u32) -> String {
        format!("{}-thin-{thin}", self.prefix)
    }

    fn alloc_thin(&self) -> Result<u32, BlockError> {
        let id = self.catalog.alloc_id()?;
        if id > MAX_THIN_ID {
            return Err(BlockError::Invalid("thin ids exhausted (24 bits)".into()));
        }
        let t = u32::try_from(id).map_err(|_| BlockError::Invalid("thin id".into()))?;
        self.catalog.add_intent(INTENT, u64::from(t))?;
        Ok(t)
    }

    fn thin_id(t: u32) -> Result<ThinDevId, BlockError> {
        ThinDevId::new_u64(u64::from(t)).map_err(dm_err)
    }

    /// Activates thin `t` (or adopts it if active).
    fn activate(&self, t: u32, size: u64) -> Result<ThinDev, BlockError> {
        let name = self.name(t);
        let pool = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ThinDev::setup(
            &self.dm,
            DmName::new(&name).map_err(dm_err)?,
            None,
            Sectors(size / SECTOR_SIZE),
            &pool,
            Self::thin_id(t)?,
        )
        .map_err(dm_err)
    }

    fn message(&self, msg: &str) -> Result<(), BlockError> {
        let pool = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        devicemapper::message(&self.dm, &*pool, msg).map_err(dm_err)
    }

    /// Deactivates (if active) and deletes thin `t` from the pool. A device still open (a
    /// live disk on a released layer) cannot be removed: the thin is marked (catalog intent
    /// plus `doomed`) and deleted when that disk is dropped.
    fn delete_thin(&self, t: u32) -> Result<(), BlockError> {
        let name = self.name(t);
        let dm_name = DmName::new(&name).map_err(dm_err)?;
        if devicemapper::device_exists(&self.dm, dm_name).map_err(dm_err)? {
            match self.dm.device_remove(&devicemapper::DevId::Name(dm_name), DmOptions::default()) {
                Ok(_) => {}
                Err(e) if is_busy(&e) => {
                    self.catalog.add_intent(DELETE_INTENT, u64::from(t))?;
                    self.doomed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(name, t);
                    return Ok(());
                }
                Err(e) => return Err(dm_err(e)),
            }
        }
        self.message(&format!("delete {t}"))
    }

    fn thin_of(rec: &LayerRecord) -> Result<u32, BlockError> {
        match rec.kind {
            LayerKind::Thin { thin_id } => Ok(thin_id),
            _ => Err(BlockError::WrongState(rec.id, "not a thin layer")),
        }
    }

    fn open_node(dev: &ThinDev) -> Result<File, BlockError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev.devnode())
            .map_err(|e| BlockError::io("open thin volume", e))
    }

    fn finish_create(&self, rec: &LayerRecord, t: u32) -> Result<(), BlockError> {
        self.catalog.insert_layer(rec)?;
        self.catalog.clear_intent(INTENT, u64::from(t))?;
        Ok(())
    }
}

impl DmThinStore {
    fn build(
        prefix: &str,
        meta: &Path,
        data: &Path,
        catalog: Arc<Catalog>,
        fresh: bool,
    ) -> Result<Self, BlockError> {
        dm_available().map_err(BlockError::Unsupported)?;
        let dm = DM::new().map_err(dm_err)?;
        let linear = |role: &str, path: &Path| -> Result<LinearDev, BlockError> {
            let name = format!("{prefix}-{role}");
            let table = vec![TargetLine::new(
                Sectors(0),
                blkdev_sectors(path)?,
                LinearDevTargetParams::Linear(LinearTargetParams::new(
                    device_of(path)?,
                    Sectors(0),
                )),
            )];
            LinearDev::setup(&dm, DmName::new(&name).map_err(dm_err)?, None, table).map_err(dm_err)
        };
        let meta_dev = linear("meta", meta)?;
        let data_dev = linear("data", data)?;
        let pool_name = format!("{prefix}-pool");
        let pool_name = DmName::new(&pool_name).map_err(dm_err)?;
        let features = vec!["skip_block_zeroing".to_string()];
        let pool = if fresh {
            // A fresh pool needs zeroed metadata (the kernel formats it).
            let mut f = OpenOptions::new()
                .write(true)
                .open(meta)
                .map_err(|e| BlockError::io("open metadata device", e))?;
            f.write_all_at(&[0u8; 4096], 0).map_err(|e| BlockError::io("clear metadata", e))?;
            f.flush_all()?;
            ThinPoolDev::new(
                &dm,
                pool_name,
                None,
                meta_dev,
                data_dev,
                DATA_BLOCK,
                DataBlocks(1),
                features,
            )
        } else {
            ThinPoolDev::setup(
                &dm,
                pool_name,
                None,
                meta_dev,
                data_dev,
                DATA_BLOCK,
                DataBlocks(1),
                features,
            )
        }
        .map_err(dm_err)?;
        let inner = Arc::new(Inner {
            dm,
            pool: Mutex::new(pool),
            prefix: prefix.to_string(),
            catalog,
            doomed: Mutex::default(),
        });
        // Recovery: thins created without a committed record are deleted.
        let named: Vec<u32> = inner
            .catalog
            .layers()?
            .iter()
            .filter_map(|r| match r.kind {
                LayerKind::Thin { thin_id } => Some(thin_id),
                _ => None,
            })
            .collect();
        for t in inner.catalog.intents(INTENT)? {
            let t32 = u32::try_from(t).unwrap_or(u32::MAX);
            if !named.contains(&t32) {
                // The thin may never have been created; a failed delete is fine.
                let _ = inner.delete_thin(t32);
            }
            inner.catalog.clear_intent(INTENT, t)?;
        }
        // Thins released while open, then a crash: their disks are gone now.
        for t in inner.catalog.intents(DELETE_INTENT)? {
            let t32 = u32::try_from(t).unwrap_or(u32::MAX);
            if !named.contains(&t32) {
                let _ = inner.delete_thin(t32);
            }
            inner.catalog.clear_intent(DELETE_INTENT, t)?;
        }
        Ok(Self { inner })
    }

    /// Creates a fresh pool named `prefix` over two block devices.
    pub fn create(
        prefix: &str,
        meta: &Path,
        data: &Path,
        catalog: Arc<Catalog>,
    ) -> Result<Self, BlockError> {
        Self::build(prefix, meta, data, catalog, true)
    }

    /// Opens an existing pool (after a restart), running the recovery pass.
    pub fn open(
        prefix: &str,
        meta: &Path,
        data: &Path,
        catalog: Arc<Catalog>,
    ) -> Result<Self, BlockError> {
        Self::build(prefix, meta, data, catalog, false)
    }

    /// Removes every active device of this store (thins, pool, linear devices);
    /// the pool's data stays on its devices.
    pub fn teardown(self) -> Result<(), BlockError> {
        let inner = &self.inner;
        let devices = inner.dm.list_devices().map_err(dm_err)?;
        let prefix = format!("{}-thin-", inner.prefix);
        for (name, _, _) in &devices {
            if name.to_string().starts_with(&prefix) {
                inner
                    .dm
                    .device_remove(&devicemapper::DevId::Name(name.as_ref()), DmOptions::default())
                    .map_err(dm_err)?;
            }
        }
        let mut pool = inner.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pool.teardown(&inner.dm).map_err(dm_err)
    }
}

impl Drop for DmThinDisk {
    /// Closes the device; if its layer was released meanwhile, removes it and deletes the thin.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = st.1.name().to_string();
        let doomed = self
            .store
            .doomed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&name);
        let Some(t) = doomed else { return };
        // Close our descriptor first (the device cannot be removed while open).
        match File::open("/dev/null") {
            Ok(null) => drop(std::mem::replace(&mut st.2, null)),
            Err(_) => return,
        }
        // Best effort: what fails here is left to the recovery pass (the intent stays).
        let deleted = self.store.delete_thin(t).is_ok()
            && !self
                .store
                .doomed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains_key(&name);
        if deleted {
            let _ = self.store.catalog.clear_intent(DELETE_INTENT, u64::from(t));
        }
    }
}

trait FlushAll {
    fn flush_all(&mut self) -> Result<(), BlockError>;
}
impl FlushAll for File {
    fn flush_all(&mut self) -> Result<(), BlockError> {
        self.sync_all().map_err(|e| BlockError::io("fsync", e))
    }
}

impl BlockStore for DmThinStore {
    type Disk = DmThinDisk;

    fn create_base(&self, size: u64, image: Option<&Path>) -> Result<LayerId, BlockError> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Invalid(format!("disk size {size}")));
        }
        let inner = &self.inner;
        let t = inner.alloc_thin()?;
        let name = inner.name(t);
        let mut dev = {
            let pool = inner.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            ThinDev::new(
                &inner.dm,
                DmName::new(&name).map_err(dm_err)?,
                None,
                Sectors(size / SECTOR_SIZE),
                &pool,
                Inner::thin_id(t)?,
            )
            .map_err(dm_err)?
        };
        let node = Inner::open_node(&dev)?;
        // A fresh thin volume reads zeroes; write the image over it.
        if let Some(img) = image {
            let src = File::open(img).map_err(|e| BlockError::io("open image", e))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            loop {
                let n = src.read_at(&mut buf, off).map_err(|e| BlockError::io("read image", e))?;
                if n == 0 {
                    break;
                }
                if off + n as u64 > size {
                    return Err(BlockError::Invalid("image larger than the disk".into()));
                }
                node.write_all_at(&buf[..n], off).map_err(|e| BlockError::io("write base", e))?;
                off += n as u64;
            }
        }
        node.sync_all().map_err(|e| BlockError::io("fsync base", e))?;
        drop(node);
        dev.teardown(&inner.dm).map_err(dm_err)?;
        let id = inner.catalog.alloc_id()?;
        let mut rec = LayerRecord::new(id, LayerKind::Thin { thin_id: t }, None, size);
        rec.frozen = true;
        inner.finish_create(&rec, t)?;
        Ok(id)
    }

    fn clone_disk(&self, layer: LayerId) -> Result<DmThinDisk, BlockError> {
        let inner = &self.inner;
        let src = inner.catalog.layer(layer)?;
        if !src.frozen {
            return Err(BlockError::WrongState(layer, "clone needs a frozen layer"));
        }
        let origin = Inner::thin_of(&src)?;
        let t = inner.alloc_thin()?;
        // The frozen origin is never active, so no suspend is needed.
        inner.message(&format!("create_snap {t} {origin}"))?;
        let dev = inner.activate(t, src.size)?;
        let id = inner.catalog.alloc_id()?;
        let rec = LayerRecord::new(id, LayerKind::Thin { thin_id: t }, None, src.size);
        inner.finish_create(&rec, t)?;
        let file = Inner::open_node(&dev)?;
        Ok(DmThinDisk { store: inner.clone(), size: src.size, state: RwLock::new((id, dev, file)) })
    }

    fn open_disk(&self, layer: LayerId) -> Result<DmThinDisk, BlockError> {
        let inner = &self.inner;
        let rec = inner.catalog.layer(layer)?;
        if rec.frozen {
            return Err(BlockError::WrongState(layer, "not writable"));
        }
        let dev = inner.activate(Inner::thin_of(&rec)?, rec.size)?;
        let file = Inner::open_node(&dev)?;
        Ok(DmThinDisk {
            store: inner.clone(),
            size: rec.size,
            state: RwLock::new((layer, dev, file)),
        })
    }

    fn hold(&self, layer: LayerId) -> Result<(), BlockError> {
        Ok(self.inner.catalog.hold_layer(layer)?)
    }

    fn release(&self, layer: LayerId) -> Result<(), BlockError> {
        let collected = self.inner.catalog.release_layer(layer)?;
        for rec in collected {
            self.inner.delete_thin(Inner::thin_of(&rec)?)?;
        }
        Ok(())
    }

    fn flatten(&self, layer: LayerId) -> Result<LayerId, BlockError> {
        // Thin volumes stand alone: nothing to flatten.
        self.inner.catalog.layer(layer)?;
        Ok(layer)
    }

    fn chain(&self, layer: LayerId) -> Result<Vec<LayerId>, BlockError> {
        Ok(self.inner.catalog.chain(layer)?.iter().map(|r| r.id).collect())
    }

    fn usage(&self) -> Result<Usage, BlockError> {
        let inner = &self.inner;
        let pool = inner.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let status = pool.status(&inner.dm, DmOptions::default()).map_err(dm_err)?;
        let block = u64::try_from(*pool.data_block_size().bytes()).unwrap_or(u64::MAX);
        let layers = inner
            .catalog
            .layers()?
            .iter()
            .filter(|r| matches!(r.kind, LayerKind::Thin { .. }))
            .count() as u64;
        match status {
            ThinPoolStatus::Working(w) => Ok(Usage {
                used_bytes: w.usage.used_data.0.saturating_mul(block),
                total_bytes: w.usage.total_data.0.saturating_mul(block),
                layers,
            }),
            _ => Err(BlockError::DeviceMapper("thin pool failed".into())),
        }
    }
}

fn zero_out(f: &File, off: u64, len: u64) -> Result<(), BlockError> {
    const BLKZEROOUT: libc::c_ulong = 0x127f;
    let range = [off, len];
    // SAFETY: BLKZEROOUT reads two u64 (offset, length) from the pointer, which
    // points to a live array of exactly that shape.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(BlockError::io("BLKZEROOUT", std::io::Error::last_os_error()))
    }
}

impl BlockIo for DmThinDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored<B: BitmapSlice>(
        &self,
        sector: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BlockError> {
        let bufs = Bufs::new(bufs);
        let off = check_range(sector, bufs.len(), self.size)?;
        let st = self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        bufs.read_from(&st.2, off, 0, bufs.len()).map_err(|e| BlockError::io("read thin", e))
    }

    fn write_vectored<B: BitmapSlice>(
        &self,
        sector: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BlockError> {
        let bufs = Bufs::new(bufs);
        let off = check_range(sector, bufs.len(), self.size)?;
        let st = self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        bufs.write_to(&st.2, off, 0, bufs.len()).map_err(|e| BlockError::io("write thin", e))
    }

    fn flush(&self) -> Result<(), BlockError> {
        let st = self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.2.sync_data().map_err(|e| BlockError::io("flush thin", e))
    }

    fn discard(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        self.write_zeroes(sector, sectors)
    }

    fn write_zeroes(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        let (off, len) = check_sectors(sector, sectors, self.size)?;
        let st = self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        zero_out(&st.2, off, len)
    }
}

impl BlockDevice for DmThinDisk {
    fn layer(&self) -> LayerId {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner).0
    }

    fn snapshot(&self) -> Result<LayerId, BlockError> {
        let inner = &self.store;
        let mut st = self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.2.sync_data().map_err(|e| BlockError::io("flush thin", e))?;
        let t = inner.alloc_thin()?;
        let name = inner.name(t);
        let mut snap = {
            let pool = inner.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.1.snapshot(
                &inner.dm,
                DmName::new(&name).map_err(dm_err)?,
                None,
                &pool,
                Inner::thin_id(t)?,
            )
            .map_err(dm_err)?
        };
        // Frozen layers are not kept active.
        snap.teardown(&inner.dm).map_err(dm_err)?;
        let old = st.0;
        let origin = Inner::thin_of(&inner.catalog.layer(old)?)?;
        let id = inner.catalog.alloc_id()?;
        let rec = LayerRecord::new(id, LayerKind::Thin { thin_id: origin }, None, self.size);
        inner.catalog.freeze_and_push(old, Some(LayerKind::Thin { thin_id: t }), &rec)?;
        inner.catalog.clear_intent(INTENT, u64::from(t))?;
        st.0 = id;
        Ok(old)
    }
}
