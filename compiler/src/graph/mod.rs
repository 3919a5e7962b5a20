//! The graph stage: what a frontend hands the compiler, and what is true of it before any loop
//! exists. The IR (`ir`), graph-to-graph passes (`passes`), the layout rules frontends and the
//! lowering share (`layout`), and an element-by-element interpreter the generated code is
//! checked against (`reference`).

pub mod ir;
pub mod layout;
pub mod passes;
pub mod reference;
