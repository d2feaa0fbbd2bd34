//! Code generated from `proto/` by build.rs. Generated types stay at the
//! edge: the RPC adapters convert them into domain types.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod flyteidl2 {
    pub mod common {
        tonic::include_proto!("flyteidl2.common");
    }
    pub mod core {
        tonic::include_proto!("flyteidl2.core");
    }
    pub mod task {
        tonic::include_proto!("flyteidl2.task");
    }
    pub mod workflow {
        tonic::include_proto!("flyteidl2.workflow");
    }
    pub mod actions {
        tonic::include_proto!("flyteidl2.actions");
    }
    pub mod auth {
        tonic::include_proto!("flyteidl2.auth");
    }
    pub mod cluster {
        tonic::include_proto!("flyteidl2.cluster");
    }
    pub mod dataproxy {
        tonic::include_proto!("flyteidl2.dataproxy");
    }
    pub mod logs {
        pub mod dataplane {
            tonic::include_proto!("flyteidl2.logs.dataplane");
        }
    }
}

/// actionsd's own services.
pub mod actionsd {
    pub mod executor {
        pub mod v1 {
            tonic::include_proto!("actionsd.executor.v1");
        }
    }
    pub mod read {
        pub mod v1 {
            tonic::include_proto!("actionsd.read.v1");
        }
    }
}

/// The encoded `FileDescriptorSet` of every proto actionsd serves.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/actionsd_descriptor.bin"));
