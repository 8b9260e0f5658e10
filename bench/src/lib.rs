//! What the VM benchmarks (`vm-bench`, `registry-bench`) share: the disk content
//! they measure on, page-cache dropping, waiting for a child with its peak memory,
//! and removing their VMs.

pub mod vm;
