//! x86_64: guest physical layout and vCPU register setup.

pub mod acpi;
pub mod cpu;
pub mod cpuid;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod pvh;
pub mod regs;

/// A vCPU ioctl that failed during setup: which one, on which vCPU. Shared by the
/// setup modules (`cpu`, `regs`) so the message has one shape.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} for vCPU {vcpu}")]
pub struct VcpuIoctlError {
    pub op: &'static str,
    pub vcpu: usize,
    #[source]
    pub source: kvm_ioctls::Error,
}

/// A `map_err` adapter: `fd.get_regs().map_err(vcpu_ioctl(index)("read registers"))`.
pub fn vcpu_ioctl(
    vcpu: usize,
) -> impl Fn(&'static str) -> Box<dyn Fn(kvm_ioctls::Error) -> VcpuIoctlError> {
    move |op| Box::new(move |source| VcpuIoctlError { op, vcpu, source })
}
