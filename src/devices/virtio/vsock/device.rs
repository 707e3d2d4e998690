//! The virtio-vsock device (virtio 1.2 §5.10, device type 19) on Firecracker's host
//! side: a listening UNIX socket for host-initiated connections and `<uds>_<port>`
//! sockets for guest-initiated ones.
//!
//! SKELETON: the interface other parts build against; the device model lands next.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::Queue;

use super::config::VsockConfig;
use crate::devices::virtio::{ActivateError, Interrupt, VirtioDevice};
use crate::memory::GuestMemory;

/// virtio device type of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vsock socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock socket {path} is in use by a running process")]
    InUse { path: PathBuf },
}

pub struct Vsock {
    cfg: VsockConfig,
    name: String,
}

impl Vsock {
    /// Creates the host side: binds and listens on `cfg.uds` (a stale socket there is
    /// replaced, a live one refused). The path is removed when the device is dropped.
    pub fn new(cfg: &VsockConfig) -> Result<Vsock, Error> {
        Ok(Vsock {
            cfg: cfg.clone(),
            name: format!("virtio-vsock cid {}", cfg.cid),
        })
    }

    pub fn config(&self) -> &VsockConfig {
        &self.cfg
    }
}

impl VirtioDevice for Vsock {
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn set_acked_features(&mut self, _acked: u64) {}
    fn config_space(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.cfg.cid.to_le_bytes().to_vec())
    }
    fn activate(
        &mut self,
        _mem: GuestMemory,
        _queues: Vec<Queue>,
        _interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        Err(ActivateError::Failed {
            device: self.name.clone(),
            what: "not built yet".into(),
        })
    }
    fn queue_notify(&mut self, _index: usize) {}
    fn reset(&mut self) {}
}
