// Swift-visible accessors for OpenMPI's handle macros (MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, ...).
// OpenMPI defines these as casts of addresses of global objects, which the Swift importer cannot see.
#ifndef CMPI_H
#define CMPI_H

#include <mpi.h>

MPI_Comm cmpi_comm_world(void);
MPI_Comm cmpi_comm_self(void);
MPI_Comm cmpi_comm_null(void);
MPI_Datatype cmpi_float(void);
MPI_Datatype cmpi_double(void);
MPI_Datatype cmpi_int32(void);
MPI_Datatype cmpi_int64(void);
MPI_Datatype cmpi_uint64(void);
MPI_Datatype cmpi_byte(void);
MPI_Op cmpi_op_sum(void);
MPI_Op cmpi_op_max(void);
MPI_Op cmpi_op_min(void);
MPI_Op cmpi_op_lor(void);
void *cmpi_in_place(void);
MPI_Errhandler cmpi_errors_return(void);
MPI_Errhandler cmpi_errors_are_fatal(void);
MPI_Request cmpi_request_null(void);
MPI_Status *cmpi_status_ignore(void);
MPI_Status *cmpi_statuses_ignore(void);
int cmpi_any_source(void);
int cmpi_success(void);
int cmpi_thread_single(void);
int cmpi_thread_funneled(void);
int cmpi_thread_serialized(void);
int cmpi_thread_multiple(void);
int cmpi_comm_type_shared(void);
MPI_Info cmpi_info_null(void);

/// Writes MPI's text for `code` into `buffer` (always NUL-terminated) and returns `buffer`.
const char *cmpi_error_string(int code, char *buffer, int capacity);

/// The MPI library's version string (e.g. "Open MPI v4.1.4, ..."), NUL-terminated in `buffer`.
const char *cmpi_library_version(char *buffer, int capacity);

#endif
