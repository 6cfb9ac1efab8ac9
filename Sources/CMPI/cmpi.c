#include "cmpi.h"
#include <stdio.h>
#include <string.h>

MPI_Comm cmpi_comm_world(void) { return MPI_COMM_WORLD; }
MPI_Comm cmpi_comm_self(void) { return MPI_COMM_SELF; }
MPI_Comm cmpi_comm_null(void) { return MPI_COMM_NULL; }
MPI_Datatype cmpi_float(void) { return MPI_FLOAT; }
MPI_Datatype cmpi_double(void) { return MPI_DOUBLE; }
MPI_Datatype cmpi_int32(void) { return MPI_INT32_T; }
MPI_Datatype cmpi_int64(void) { return MPI_INT64_T; }
MPI_Datatype cmpi_uint64(void) { return MPI_UINT64_T; }
MPI_Datatype cmpi_byte(void) { return MPI_BYTE; }
MPI_Op cmpi_op_sum(void) { return MPI_SUM; }
MPI_Op cmpi_op_max(void) { return MPI_MAX; }
MPI_Op cmpi_op_min(void) { return MPI_MIN; }
MPI_Op cmpi_op_lor(void) { return MPI_LOR; }
void *cmpi_in_place(void) { return MPI_IN_PLACE; }
MPI_Errhandler cmpi_errors_return(void) { return MPI_ERRORS_RETURN; }
MPI_Errhandler cmpi_errors_are_fatal(void) { return MPI_ERRORS_ARE_FATAL; }
MPI_Request cmpi_request_null(void) { return MPI_REQUEST_NULL; }
MPI_Status *cmpi_status_ignore(void) { return MPI_STATUS_IGNORE; }
MPI_Status *cmpi_statuses_ignore(void) { return MPI_STATUSES_IGNORE; }
int cmpi_any_source(void) { return MPI_ANY_SOURCE; }
int cmpi_success(void) { return MPI_SUCCESS; }
int cmpi_thread_single(void) { return MPI_THREAD_SINGLE; }
int cmpi_thread_funneled(void) { return MPI_THREAD_FUNNELED; }
int cmpi_thread_serialized(void) { return MPI_THREAD_SERIALIZED; }
int cmpi_thread_multiple(void) { return MPI_THREAD_MULTIPLE; }
int cmpi_comm_type_shared(void) { return MPI_COMM_TYPE_SHARED; }
MPI_Info cmpi_info_null(void) { return MPI_INFO_NULL; }

const char *cmpi_error_string(int code, char *buffer, int capacity) {
    if (capacity <= 0) return buffer;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) {
        length = snprintf(text, sizeof text, "unknown MPI error %d", code);
    }
    if (length >= capacity) length = capacity - 1;
    memcpy(buffer, text, (size_t)length);
    buffer[length] = 0;
    return buffer;
}

const char *cmpi_library_version(char *buffer, int capacity) {
    if (capacity <= 0) return buffer;
    char text[MPI_MAX_LIBRARY_VERSION_STRING];
    int length = 0;
    MPI_Get_library_version(text, &length);
    if (length >= capacity) length = capacity - 1;
    memcpy(buffer, text, (size_t)length);
    buffer[length] = 0;
    return buffer;
}
