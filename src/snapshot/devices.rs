//! (filled by the snapshot device/kvm helper)
