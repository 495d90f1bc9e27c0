//! The `shopctrl.messaging.v1` contracts: gRPC services of config and routing, and the protobuf
//! events that travel over RabbitMQ. Generated from the `.proto` files beside this crate; the
//! encoded descriptor set is exported for gRPC server reflection.

/// Package `shopctrl.messaging.v1`.
pub mod v1 {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used,
        clippy::expect_used
    )]
    tonic::include_proto!("shopctrl.messaging.v1");
}

/// The encoded `FileDescriptorSet` of every contract, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shopctrl_descriptor");

/// The AMQP `type` property of a protobuf message: its fully qualified name.
pub fn type_name<M: prost::Name>() -> String {
    M::full_name()
}

pub use prost::Message;
