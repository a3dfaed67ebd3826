// A registered op as a typed handle, for C++ that calls fastbptt's own ops through the dispatcher
// (csrc/cell_ops.cpp, csrc/cell_chain.cpp): dispatch keys, modes and tensor subclasses then see
// the call as they see one from Python. Look a handle up once (a function-local static).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace fastbptt {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace fastbptt
