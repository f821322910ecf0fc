// The simulator's stand-in: the half types are in cuda_runtime.h (c10's, bit for bit CUDA's).
#pragma once
#include "cuda_runtime.h"
